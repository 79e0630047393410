"""Two engines in one script (a GAN): the generator's loss flows through the discriminator, so one engine's
backward reaches the other's parameters after that engine reduced them. dsrun keeps such gradients as
PyTorch and DeepSpeed (stage 0) do: in `.grad` until a `zero_grad()`, reduced with the engine's next
backward or at its next step (runtime/zero/reducer.py's [Note: stray gradients]; issue 16's two-engine
defect). Each pattern must train exactly as plain PyTorch with two optimizers over the global batch."""
import torch

from tests.runtime._dist import run_ranks

MICRO, STEPS, NZ = 2, 3, 4


def _models():
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(NZ, 6), torch.nn.Tanh())
    disc = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    return gen, disc


def _data(world):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(MICRO * world, 6, generator=g), torch.randn(MICRO * world, NZ, generator=g))
            for _ in range(STEPS)]


def _iteration(pattern, netG, netD, backD, backG, stepD, stepG, real, noise):
    """One GAN iteration in `pattern`'s order; back*/step* are the engines' or plain PyTorch's."""
    bce = torch.nn.BCELoss()
    ones, zeros = torch.ones(real.shape[0]), torch.zeros(real.shape[0])
    if pattern == "dcgan":  # gan_deepspeed_train.py's order: module zero_grad() drops the stray gradients
        netD.zero_grad()
    backD(bce(netD(real).view(-1), ones))
    fake = netG(noise)
    backD(bce(netD(fake.detach()).view(-1), zeros))
    if pattern == "stray_before_step":  # the generator's backward reaches D before D's step: D's step uses it
        backG(bce(netD(fake).view(-1), ones))
        stepD()
        stepG()
        return
    stepD()
    if pattern == "dcgan":
        netG.zero_grad()
    backG(bce(netD(fake).view(-1), ones))  # reaches D's parameters after D reduced them: kept in .grad
    stepG()


def _reference(pattern, world):
    netG, netD = _models()
    optD = torch.optim.SGD(netD.parameters(), lr=0.1, momentum=0.9)
    optG = torch.optim.SGD(netG.parameters(), lr=0.1, momentum=0.9)

    def step(opt):  # DeepSpeed's step() clears the gradients it applied
        opt.step()
        opt.zero_grad()
    for real, noise in _data(world):
        _iteration(pattern, netG, netD, lambda l: l.backward(), lambda l: l.backward(),
                   lambda: step(optD), lambda: step(optG), real, noise)
    return [p.detach().clone() for p in list(netG.parameters()) + list(netD.parameters())]


def _engines(rank, world, stage, pattern):
    import dsrun
    config = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}
    netG, netD = _models()
    engG, *_ = dsrun.initialize(model=netG, config=config)
    engD, *_ = dsrun.initialize(model=netD, config=config)
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    try:
        for real, noise in _data(world):
            _iteration(pattern, netG, netD, engD.backward, engG.backward, engD.step, engG.step,
                       real[rows], noise[rows])
        return [p.detach().clone() for p in list(netG.parameters()) + list(netD.parameters())]
    finally:
        engG.destroy()
        engD.destroy()


PATTERNS = ("dcgan", "no_zero_grad", "stray_before_step")


def _all(rank, world):
    return {(stage, pattern): _engines(rank, world, stage, pattern) for stage in (0, 1, 2) for pattern in PATTERNS}


def test_gan_patterns_train_as_plain_pytorch():
    results = run_ranks(_all, world_size=2)
    for pattern in PATTERNS:
        expected = _reference(pattern, 2)
        for stage in (0, 1, 2):
            for rank, got in enumerate(results):
                for e, g in zip(expected, got[(stage, pattern)]):
                    assert torch.allclose(e, g, atol=1e-6), (pattern, stage, rank, (e - g).abs().max())


def _stage3(rank, world):
    try:
        _engines(rank, world, 3, "dcgan")
        return "trained"
    except RuntimeError as err:
        return str(err)


def test_stage3_refuses_stray_gradients_by_name():
    for message in run_ranks(_stage3, world_size=2):
        assert "arrived outside this engine's backward" in message and "ZeRO stage 3" in message, message


def _prescaled_rereduction(rank, world):
    """ZeRO-1 with gradient accumulation reduces its full buffer at the boundary; a stray gradient arriving
    after that reduces the buffer again at the step. With prescale_gradients the first reduction used to
    halve the buffer in place, so the second counted the earlier gradients at half weight."""
    import dsrun
    weights = []
    for prescale in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        engine, *_ = dsrun.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "prescale_gradients": prescale,
            "gradient_predivide_factor": 2.0})
        g = torch.Generator().manual_seed(rank)
        xs = [torch.randn(2, 4, generator=g) for _ in range(3)]
        engine.backward(engine(xs[0]).pow(2).sum())
        engine.step()
        engine.backward(engine(xs[1]).pow(2).sum())  # the boundary: reduced here
        (engine(xs[2]).pow(2).sum() / 2).backward()  # outside engine.backward: reduced again at the step
        engine.step()
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        engine.destroy()
    return torch.allclose(weights[0], weights[1], atol=1e-6)


def test_prescaled_buffer_reduced_twice_counts_once():
    assert run_ranks(_prescaled_rereduction, world_size=2) == [True, True]
