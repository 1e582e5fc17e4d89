"""Live migration of a QEMU guest with vballoon attached, skipping the free pages.

:func:`migrate_source` / :func:`migrate_destination` (engine.py), the write tracker (dirty.py),
the stream between the two sides (stream.py, protocol/migration-stream.md).  MIGRATION.md has the
design, the privileges needed and the figures.
"""
from vballoon.migrate.engine import (DestOptions, MigrationError, SourceOptions, Summary, migrate_destination,
                     migrate_source)

__all__ = ["DestOptions", "MigrationError", "SourceOptions", "Summary", "migrate_destination",
           "migrate_source"]
