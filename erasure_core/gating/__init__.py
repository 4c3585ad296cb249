"""Prompt-dependent gating: the facilitated-transport gate (``ft_gate``) and how several SPM membranes
combine into one edit (``spm_combine``).

Import from the modules themselves; the package root's ``__init__`` holds the public API."""
