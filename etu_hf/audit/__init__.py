"""The suppression audit: ``audit()`` and its report (see :mod:`etu_hf.audit.core`)."""

from etu_hf.audit.core import audit
from etu_hf.audit.report import DEFINITIONS, REPORT_FORMAT, REPORT_VERSION, AuditReport

__all__ = ["DEFINITIONS", "REPORT_FORMAT", "REPORT_VERSION", "AuditReport", "audit"]
