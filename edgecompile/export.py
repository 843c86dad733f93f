"""The public Python API in one import (the commands live in edgecompile/commands/, one module each):

    from edgecompile.export import CompressionOptions, ExportOptions, run_export
    from edgecompile.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint("my_ckpt")
    [report] = run_export(ckpt, ExportOptions(output=Path("dist"), widths=[0.5], compression=CompressionOptions(bits="mixed")),
                          on_stage=print)
    print(report.path, report.verify.psnr_db, report.average_bits)

`run_export` prints nothing by itself: pass `on_stage` (told each stage as it starts) and `progress` (each step
within one), or `log_progress()` for plain log lines.
"""

from edgecompile.commands.export import export_width, run_export
from edgecompile.commands.options import CompressionOptions, ExportOptions, LatentPlan, PackageOptions, SweepSettings, VerificationOptions
from edgecompile.commands.progress import log_progress
from edgecompile.commands.sample import SampleOptions, run_sample
from edgecompile.commands.sweep import SweepOptions, run_sweep
from edgecompile.commands.verify import verify_every_function, verify_exported
from edgecompile.commands.write import package_name

__all__ = ["CompressionOptions", "ExportOptions", "LatentPlan", "PackageOptions", "SampleOptions", "SweepOptions", "SweepSettings",
           "VerificationOptions", "export_width", "log_progress", "package_name", "run_export", "run_sample", "run_sweep",
           "verify_every_function", "verify_exported"]
