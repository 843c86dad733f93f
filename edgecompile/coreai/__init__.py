"""The Core AI target (`--format aimodel`): Apple's 2026 runtime generation beside Core ML.

    convert.py   a deploy graph -> torch.export -> coreai-torch's converter -> an `.aimodel` asset, with
                 edgecompile's own LUTs and indices inside (coreai::lut_to_dense) and its metadata record
    runtime.py   the asset read back (functions, I/O, metadata) and executed by Core AI's own runtime, which
                 runs on Linux as on macOS: what verifies an `.aimodel`, and the oracle for the MIL interpreter
    denoiser.py  the denoiser's asset in fp16 compute where that runtime holds it to the bar, fp32 where not

coreai-core and coreai-torch are an optional extra (`pip install edgecompile[coreai]`): imported here only, and
only when an `.aimodel` is written or read.
"""
