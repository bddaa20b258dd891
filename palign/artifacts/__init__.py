"""Artifacts every stage writes and reads; each name has one home, imported from it.

`errors`: bad input and full disks; `writes`: atomic files and strict JSON; `readers`: strict JSON
and JSONL records; `digests`: fingerprints and file digests; `stores`: the resumable record stores
of the cached stages and their locks.
"""
