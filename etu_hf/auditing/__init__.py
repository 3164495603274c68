"""The suppression audit: ``audit()`` and its report (see :mod:`etu_hf.auditing.core`)."""

from etu_hf.auditing.core import audit
from etu_hf.auditing.report import DEFINITIONS, REPORT_FORMAT, REPORT_VERSION, AuditReport

__all__ = ["DEFINITIONS", "REPORT_FORMAT", "REPORT_VERSION", "AuditReport", "audit"]
