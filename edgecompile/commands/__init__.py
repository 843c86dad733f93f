"""The commands, one module each, over the compiler's layers (model -> deploy -> compress -> coreml):

    options.py      the export's typed option groups and the `resolve()` convention
    compression.py  the compress step (calibrate -> statistics -> sweep -> palettize -> self-distill)
    write.py        the package writers: one entry point over layouts (single, chunked, multifunction) and formats
    export.py       `export`: extract -> rewrite -> compress -> write -> verify -> report, per width
    sweep.py        `sweep`: a mixed-bit recipe for one width
    verify.py       `verify`: a written package against its checkpoint
    sample.py       `sample`: the app's sampling loop through a package
    progress.py     stage lines for logs (stderr not a terminal)
    render.py       the tables the CLI prints
"""
