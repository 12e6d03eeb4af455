"""idsfs: mount an ICAT Data Service (IDS) archive as a directory tree.

The package holds three things: the ``IDSClient``/``DataSelection`` client
library (:mod:`idsfs.ids`) with a small ICAT REST client (:mod:`idsfs.icat`),
the FUSE daemon built on them, and an emulator of ICAT + IDS
(:mod:`idsfs.emulator`) that the tests, the benchmarks and ``idsfs demo`` use.
"""

__version__ = "0.1.0"
