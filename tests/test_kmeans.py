import numpy as np
import pytest

from edgecompile.compress.kmeans import palettize
from edgecompile.errors import EdgeCompileError


def coremltools_mse(w, nbits):
    from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools

    import_coremltools()
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    with quiet_coremltools():
        lut, idx = _get_kmeans_lookup_table_and_weight(nbits, w)
    deq = lut.astype(np.float16).reshape(-1)[np.asarray(idx).reshape(-1)].reshape(w.shape)
    return np.mean((deq.astype(np.float64) - w.astype(np.float64)) ** 2)


# issue 4's target: at most 0.1% above coremltools' exact DP (these tensors take its exact path: >= 10k elements)
@pytest.mark.parametrize("nbits,bound", [(4, 1.001), (8, 1.001)])
@pytest.mark.parametrize("dist", ["normal", "heavy-tailed"])
def test_mse_close_to_coremltools_exact_kmeans(nbits, bound, dist):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((192, 256)) if dist == "normal" else rng.standard_t(3, (192, 256))
    w = (raw * 0.02).astype(np.float16)
    p = palettize(w, nbits)
    ours = np.mean((p.decode().astype(np.float64) - w.astype(np.float64)) ** 2)
    assert ours <= coremltools_mse(w, nbits) * bound


@pytest.mark.parametrize("k", [3, 16, 64])
def test_banded_dp_with_a_window_over_everything_is_the_exact_dp(k):
    from edgecompile.compress import kmeans as km

    rng = np.random.default_rng(k)
    values = np.sort(rng.standard_t(3, 300))
    weights = rng.integers(1, 20, 300).astype(np.float64)
    w_cum, s1_cum, s2_cum = km.prefix_sums(values, weights)
    start = np.linspace(0, 300, k + 1).astype(np.int64)
    banded, _, _ = km._banded_dp(start, np.full(k - 1, 300), w_cum, s1_cum, s2_cum)
    exact = km._exact_dp(values, weights, k)
    assert km._sse(banded, w_cum, s1_cum, s2_cum) == pytest.approx(km._sse(exact, w_cum, s1_cum, s2_cum), rel=1e-12)


def test_palette_shapes_and_decoding():
    w = (np.random.default_rng(0).standard_normal((64, 40)) * 0.1).astype(np.float16)
    p = palettize(w, 4, group_size=16)
    assert p.lut.shape == (4, 16) and p.lut.dtype == np.float16
    assert p.indices.shape == w.shape and p.indices.dtype == np.uint8 and p.indices.max() < 16
    dec = p.decode()
    for g in range(4):
        rows = slice(16 * g, 16 * (g + 1))
        assert set(np.unique(dec[rows])) <= set(p.lut[g])
    per_tensor = palettize(w, 4)
    err_group = np.mean((dec.astype(np.float64) - w) ** 2)
    err_tensor = np.mean((per_tensor.decode().astype(np.float64) - w) ** 2)
    assert err_group < err_tensor  # four LUTs fit better than one


def test_few_distinct_values_are_kept_exactly():
    w = np.array([[0.5, -1.0, 0.25], [0.5, 0.5, -1.0]], dtype=np.float16)
    assert np.array_equal(palettize(w, 2).decode(), w)


def test_bad_requests_are_clear_errors():
    w = np.ones((6, 4), dtype=np.float16)
    with pytest.raises(EdgeCompileError, match="5-bit"):
        palettize(w, 5)
    with pytest.raises(EdgeCompileError, match="group-size 4 does not divide"):
        palettize(w, 4, group_size=4)
    with pytest.raises(EdgeCompileError, match="inf/nan"):
        palettize(np.array([[np.inf]], dtype=np.float32), 4)


def test_threaded_element_passes_match_one_thread(monkeypatch):
    from edgecompile.compress import kmeans as km

    w = (np.random.default_rng(2).standard_normal((2048, 2048)) * 0.02).astype(np.float16)
    assert w.size >= km.PARALLEL_MIN_ELEMENTS
    threaded = palettize(w, 4)
    monkeypatch.setattr(km, "PARALLEL_MIN_ELEMENTS", w.size + 1)
    single = palettize(w, 4)
    assert np.array_equal(threaded.lut, single.lut) and np.array_equal(threaded.indices, single.indices)
    assert np.array_equal(threaded.decode(), single.decode())
