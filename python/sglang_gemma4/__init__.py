"""sglang-gemma4: a SGLang plugin that makes Gemma-4 serving fast and robust.

The plugin is loaded by SGLang's own plugin framework (entry point group
``sglang.srt.plugins``); see :mod:`sglang_gemma4.plugin`.
"""

__version__ = "0.1.0"

# Our hooks target SGLang internals: every patch is checked against this list
# and stands down (one log line) on any other version.
SUPPORTED_SGLANG_VERSIONS = ("0.5.17",)
