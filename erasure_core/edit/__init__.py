"""The edit algebra: closed-form solves (``linalg``), the ``PatchSet`` every method returns (``patch``),
eraser adapters (``adapters``) and low-rank extraction of weight differences (``extract``).

Import from the modules themselves; the package root's ``__init__`` holds the public API."""
