"""The one module that imports coremltools (a leaf: it depends only on `atomic`).

coremltools prints version warnings and progress bars on import and conversion, and its optional imports' bare
`except:` would swallow a Ctrl-C/SIGTERM that arrived during the import. Every other module gets coremltools, and
the few of its submodules edgecompile uses, from here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings

from edgecompile.atomic import interrupts_deferred


@contextlib.contextmanager
def quiet_coremltools():
    """Keep coremltools' import and conversion chatter out of our output."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        yield


@functools.cache  # helpers call this per op in the interpreter: the quiet context (logger levels) costs ~0.2 ms
def import_coremltools():
    """coremltools, imported quietly and with Ctrl-C/SIGTERM held back until the import is done."""
    with interrupts_deferred(), quiet_coremltools():
        import coremltools as ct
    return ct


@functools.cache
def kmeans1d():
    """coremltools' bundled exact O(kn) DP for 1-D k-means (the one its palettizer uses)."""
    import_coremltools()
    from coremltools._deps import kmeans1d as module

    return module


def mil_types():
    """coremltools.converters.mil.mil.types (MIL dtypes)."""
    import_coremltools()
    from coremltools.converters.mil.mil import types

    return types


def unpack_bits(packed, nbits: int, n: int):
    """coremltools' decoder of iOS16/17 packed LUT indices."""
    import_coremltools()
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    return restore_elements_from_packed_bits(packed, nbits, n)


def load_mil_program(path: str):
    """(spec, pymil Program) of a saved .mlpackage, read without loading it into Core ML."""
    ct = import_coremltools()
    with quiet_coremltools():
        from coremltools.converters.mil.frontend.milproto import load as milproto_load

        ml = ct.models.MLModel(path, skip_model_load=True)
        spec = ml.get_spec()
        return spec, milproto_load.load(spec, spec.specificationVersion, ml.weights_dir)


def model_proto():
    """coremltools' Model protobuf module (Model_pb2), to read and rewrite a package's model.mlmodel."""
    import_coremltools()
    from coremltools.proto import Model_pb2

    return Model_pb2
