"""Runnable jobs, the top floor: pretraining (`pretrain`), the alignment comparison (`align`), the
π* convergence study (`pistar`), the phenomena studies (`phenomena`) and their plots (`plots`).
`experiments/*.py` are their command lines; no module below this package imports it."""
