"""Property tests of the linear algebra behind every method."""
import pytest
import torch

from conftest import SHAPES, output_error, random_problem
from svdcore.decompose import eigen_whitening, truncate_svd, truncate_whitened, whitening
from svdcore.gram import GramAccumulator
from svdcore.ranks import keeps_dense, parameter_count, rank_for_ratio, uniform_ranks


def optimal_error(weight, x, rank):
    """Best achievable ||(W - W') X^T||^2 over rank-r W' ("output PCA"): the energy of W X^T
    outside its top-r left singular directions."""
    s = torch.linalg.svdvals(weight @ x.T)
    return (s[rank:] ** 2).sum()


def test_rank_formula_and_break_even():
    assert rank_for_ratio(576, 576, 0.2) == 230  # floor(576*576*0.8/1152) = floor(230.4)
    assert rank_for_ratio(1536, 576, 0.4) == 251  # floor(1536*576*0.6/2112) = floor(251.3)
    for m, n, ratio in [(576, 576, 0.2), (1536, 576, 0.4), (192, 576, 0.05), (100, 7, 0.5)]:
        r = rank_for_ratio(m, n, ratio)
        assert r * (m + n) <= m * n * (1 - ratio) < (r + 1) * (m + n)
    assert keeps_dense(4, 4, 2) and not keeps_dense(4, 4, 1)  # break-even 4*4/8 = 2
    assert rank_for_ratio(8, 8, 0.999) == 1  # never rank 0


def test_uniform_ranks_hit_the_ratio_and_ratio_zero_keeps_dense():
    shapes = {"q": [576, 576], "k": [192, 576], "gate": [1536, 576], "down": [576, 1536]}
    dense = parameter_count(shapes, {n: None for n in shapes})
    for ratio in (0.1, 0.2, 0.4, 0.6):
        kept = parameter_count(shapes, uniform_ranks(shapes, ratio))
        assert 1 - kept / dense == pytest.approx(ratio, abs=0.01)
    assert set(uniform_ranks(shapes, 0.0).values()) == {None}


@pytest.mark.parametrize("m,n", SHAPES)
def test_plain_svd_error_is_the_dropped_singular_values(m, n):
    weight, _ = random_problem(m, n, 10)
    a, b = truncate_svd(weight, 7)
    s = torch.linalg.svdvals(weight)
    assert torch.linalg.matrix_norm(weight - a @ b) ** 2 == pytest.approx(float((s[7:] ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_whitened_truncation_loss_equals_dropped_whitened_singular_values(m, n, rank):
    weight, x = random_problem(m, n, tokens=4 * n)
    white = whitening(x.T @ x)
    assert white.route == "cholesky"
    a, b = truncate_whitened(weight, white, rank)
    dropped = torch.linalg.svdvals(weight @ white.factor)[rank:]
    loss = output_error(weight, a, b, x)
    assert loss == pytest.approx(float((dropped**2).sum()), rel=1e-9)
    # and it is the best any rank-r matrix can do on this data
    assert loss == pytest.approx(float(optimal_error(weight, x, rank)), rel=1e-9)
    # SVD-LLM beats plain SVD on the output error whenever the data is not white
    pa, pb = truncate_svd(weight, rank)
    assert loss <= output_error(weight, pa, pb, x)


def test_singular_gram_falls_back_and_stays_near_optimal():
    m, n, rank = 24, 40, 6
    weight, x = random_problem(m, n, tokens=16)  # 16 tokens < 40 features: G has rank 16
    gram = x.T @ x
    assert torch.linalg.cholesky_ex(gram).info != 0 or torch.linalg.matrix_rank(gram) < n
    white = whitening(gram)
    assert white.route != "cholesky"
    a, b = truncate_whitened(weight, white, rank)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    best = optimal_error(weight, x, rank)
    assert output_error(weight, a, b, x) <= best * (1 + 1e-3) + 1e-9 * gram.diagonal().mean()


def test_eigen_route_is_exactly_optimal_on_a_singular_gram():
    m, n, rank = 24, 40, 6
    weight, x = random_problem(m, n, tokens=16)
    white = eigen_whitening(x.T @ x)
    assert white.route == "eigen" and white.factor.shape == (n, 16)
    a, b = truncate_whitened(weight, white, rank)
    assert output_error(weight, a, b, x) == pytest.approx(float(optimal_error(weight, x, rank)), rel=1e-8)


def test_indefinite_gram_ends_on_the_eigen_route():
    _, x = random_problem(8, 12, tokens=50)
    gram = x.T @ x
    v = torch.linalg.eigh(gram).eigenvectors[:, -1:]
    broken = gram - 2 * torch.linalg.eigvalsh(gram).max() * (v @ v.T)  # a large negative eigenvalue
    assert whitening(broken).route == "eigen"


def test_batched_gram_equals_one_shot_product():
    _, x = random_problem(4, 48, tokens=300, seed=3)
    acc = GramAccumulator(48, torch.device("cpu"))
    for chunk in x.float().split(64):
        acc.add(chunk.view(2, -1, 48) if len(chunk) == 64 else chunk)
    expected = x.float().double().T @ x.float().double()
    assert acc.tokens == 300
    torch.testing.assert_close(acc.gram, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def gram_with_spectrum(n, eigenvalues, seed):
    """Q diag(λ) Q^T with a random orthogonal Q: any conditioning, singular included."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * eigenvalues) @ q.T


def whitened_loss(weight, a, b, gram):
    d = weight - a @ b
    return float(((d @ gram) * d).sum())


SPECTRA = {
    "random": lambda n: torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.1,
    "ill-conditioned": lambda n: torch.logspace(0, -12, n, dtype=torch.float64),
    "singular": lambda n: torch.cat([torch.logspace(0, -6, n // 2, dtype=torch.float64),
                                     torch.zeros(n - n // 2, dtype=torch.float64)]),
}


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("rank", [1, 6, 11])
def test_every_route_loses_the_same(m, n, spectrum, rank):
    """svd, eigh-out (on G itself and on W S) and eigh-in reach the same optimum: the whitened
    loss is the sum of the dropped σ_i^2(W S), to 1e-9 relative in float64."""
    from svdcore.decompose import choose_route, truncate

    weight, _ = random_problem(m, n, 1, seed=rank)
    gram = gram_with_spectrum(n, SPECTRA[spectrum](n), seed=m + n)
    white = eigen_whitening(gram) if spectrum == "singular" else whitening(gram)
    assert white.route == ("eigen" if spectrum == "singular" else "cholesky")
    dropped = float((torch.linalg.svdvals(white.apply(weight))[rank:] ** 2).sum())
    losses = {route: whitened_loss(weight, *truncate(weight, rank, white, route), gram)
              for route in ("svd", "eigh-out", "eigh-in")}
    losses["eigh-out on G"] = whitened_loss(weight, *truncate(weight, rank, None, "eigh-out", gram=gram), gram)
    for route, loss in losses.items():
        assert loss == pytest.approx(dropped, rel=1e-9), route
    assert choose_route("auto", m, n) == ("eigh-out" if m <= n else "eigh-in")


@pytest.mark.parametrize("multiple", [8, 64])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4])
def test_ranks_rounded_to_a_multiple_spend_the_same_budget(multiple, ratio):
    from svdcore.ranks import round_to_multiple

    shapes = {f"l{i}.{name}": shape for i in range(4) for name, shape in
              {"q": [4096, 4096], "k": [1024, 4096], "gate": [11008, 4096], "down": [4096, 11008],
               "tiny": [48, 40]}.items()}
    raw = uniform_ranks(shapes, ratio)
    rounded = round_to_multiple(shapes, raw, multiple)
    spent, budget = parameter_count(shapes, rounded), parameter_count(shapes, raw)
    assert spent <= budget
    for name, rank in rounded.items():
        m, n = shapes[name]
        assert not keeps_dense(m, n, rank)
        # what is left buys no further step for any matrix that may still grow
        assert multiple * (m + n) > budget - spent or keeps_dense(m, n, rank + multiple)
        assert rank % multiple == 0 or rank == raw[name] < multiple  # "tiny" keeps its small rank
    assert round_to_multiple(shapes, raw, 1) == raw
    assert round_to_multiple(shapes, raw, multiple) == rounded  # deterministic


def test_bf16_inputs_are_summed_in_fp32_without_loss_beyond_the_summation_order():
    from svdcore.gram import batch_gram

    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    exact = x.double().T @ x.double()  # bf16 products are exact in fp32 and fp64 alike
    gram = batch_gram(x)
    assert gram.dtype == torch.float32
    assert torch.linalg.norm(gram.double() - exact) / torch.linalg.norm(exact) < 1e-6


def test_an_unknown_route_is_refused_not_taken_for_another():
    # the user's compress.route is checked by params.yaml's types (test_params_and_errors); a library
    # caller's unknown route must not silently fall through to one of the routes
    from svdcore.decompose import choose_route

    with pytest.raises(ValueError, match=r"route 'qr' is none of \('auto', 'svd', 'eigh-out', 'eigh-in'\)"):
        choose_route("qr", 4, 8)
