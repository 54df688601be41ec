"""One module per patch; each defines ``PATCH`` (see :mod:`sglang_gemma4.registry`).

Modules are discovered by name, so adding a patch is adding a file. Keep
module top-levels free of heavy SGLang imports: ``sglang-gemma4 status`` and
every SGLang process import all of them.
"""
