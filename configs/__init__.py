"""Training configs (`--config=configs/<name>.py`, loaded by path); a package so that one can build on another."""
