import torch

from model.pooling import GraphPool, compose, farthest_point_sampling, segments_to_pixels, soft_map


def brute_fps(x: torch.Tensor, m: int) -> list[int]:
    pts = x.tolist()

    def d2(a, b):
        return sum((p - q) ** 2 for p, q in zip(a, b))

    mean = [sum(c) / len(pts) for c in zip(*pts)]
    chosen = [max(range(len(pts)), key=lambda i: d2(pts[i], mean))]
    while len(chosen) < m:
        chosen.append(max(range(len(pts)), key=lambda i: min(d2(pts[i], pts[c]) for c in chosen)))
    return chosen


def test_fps_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 5, generator=g, dtype=torch.float64)
    got = farthest_point_sampling(x, 12)
    for b in range(3):
        assert got[b].tolist() == brute_fps(x[b], 12)
    assert len(set(got[0].tolist())) == 12


def test_pool_rows_sum_to_one_and_pixel_map_follows_argmax():
    torch.manual_seed(0)
    x = torch.randn(2, 196, 32)
    p1, p2 = GraphPool(32, 64), GraphPool(32, 16)
    s1, a1 = p1(x)
    s2, a2 = p2(s1)
    assert s1.shape == (2, 64, 32) and s2.shape == (2, 16, 32)
    for a in (a1, a2, compose([a1, a2])):
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-5)
    labels = torch.arange(196).view(14, 14).repeat_interleave(16, 0).repeat_interleave(16, 1).expand(2, -1, -1)
    seg = segments_to_pixels(labels, [a1, a2])
    assert seg.shape == (2, 224, 224) and seg.max() < 16
    # every pixel lands in argmax(a2[argmax(a1[its superpixel])])
    for b in range(2):
        for y, xx in [(0, 0), (100, 37), (223, 223), (57, 190)]:
            sp = labels[b, y, xx]
            assert seg[b, y, xx] == a2[b, a1[b, sp].argmax()].argmax()
    # a one-hot weight on a segment paints exactly the composed soft assignment to it
    w = torch.zeros(2, 16)
    w[:, 3] = 1
    heat = soft_map(labels, [a1, a2], w)
    assert torch.allclose(heat[0, 0, 0], compose([a1, a2])[0, labels[0, 0, 0], 3])


def test_pool_gets_gradients():
    x = torch.randn(1, 30, 8, requires_grad=True)
    pool = GraphPool(8, 6)
    seg, _ = pool(x)
    seg.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in pool.parameters())
