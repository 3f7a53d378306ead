"""The per-format importers of :func:`engine.data.prepare.prepare`: raw recommendation data -> the
canonical folder of :mod:`engine.data.layout`.

:mod:`~engine.data.importers.release`
    ``dealrec-release``: the layout the DEALRec authors ship.
:mod:`~engine.data.importers.recbole`
    ``recbole``: RecBole atomic files.
:mod:`~engine.data.importers.amazon`
    ``amazon``: raw Amazon review and metadata JSON lines.
:mod:`~engine.data.importers.interactions`
    What recbole and amazon share: an interaction table cut at ``--until``, filtered by rating,
    split by time and indexed (:func:`~engine.data.importers.interactions.from_interactions`).
:mod:`~engine.data.importers.common`
    What every importer shares: placeholder titles, part-file sizes, the final meta.json.

Each importer takes its input, the temporary output folder of :func:`engine.data.schema.atomic_dir`
and the meta.json header built by :mod:`engine.data.prepare` (it does not import that module,
which imports these), and returns the meta.json it wrote.
"""
