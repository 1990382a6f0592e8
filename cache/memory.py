"""Buffers stored values are read into: huge-page advised (hugepages.py), and pooled so that
they are not faulted in again at all (figures in bench/NOTES.md)."""

from __future__ import annotations

from hugepages import BufferPool

read_buffers = BufferPool()
