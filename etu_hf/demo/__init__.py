"""The demo: a tiny Llama pretrained on a generated corpus (``assets/tiny-llama``) and ``etu-hf demo``."""

import os

#: The demo model shipped with the package; the CLI's model when --model_name_or_path is not given.
DEMO_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "tiny-llama")
