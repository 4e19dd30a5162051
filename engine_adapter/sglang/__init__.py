"""Irminsul as an SGLang 0.5.23 radix-cache backend (``--radix-cache-backend irminsul``).

Importing this package imports nothing of SGLang: plugin.py imports it inside its functions and
cache.py is loaded only by the backend's factory. See DESIGN.md.
"""
