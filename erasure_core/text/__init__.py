"""Text: the encoded-text type and token picks (``encoded``), the plain-torch CLIP text encoder (``clip``)
and the encoding cache (``cache``).

Import from the modules themselves; the package root's ``__init__`` holds the public API."""
