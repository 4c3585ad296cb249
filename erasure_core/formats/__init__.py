"""File formats users exchange: concept lists and presets (``concept_files``), eraser files and their
key namings (``eraser_files``, ``eraser_formats``) and SPM files (``spm``).

Import from the modules themselves; the package root's ``__init__`` holds the public API."""
