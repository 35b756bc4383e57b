"""Filesystem primitives: durable atomic writes, deletion through directory fds, plain names."""
