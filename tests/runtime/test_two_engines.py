"""Two engines in one script (a GAN): a backward of one engine that reaches the other's parameters after that
engine reduced them names the real cause, not reentrant checkpointing (issue 16's two-engine defect). Taking
such gradients (DeepSpeed accumulates them until zero_grad()) is not built yet: the generator's loss, which
must flow through the discriminator, still stops with this message."""
import torch

from tests.runtime._dist import run_ranks

CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}


def _gan(rank, world, detach):
    import dsrun
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    g_engine, *_ = dsrun.initialize(model=gen, config=CONFIG)
    d_engine, *_ = dsrun.initialize(model=disc, config=CONFIG)
    try:
        for _ in range(2):  # DCGAN's order: the discriminator's step, then the generator's
            fake = g_engine(torch.randn(2, 4))
            d_loss = d_engine(fake.detach() if detach else fake).mean()
            d_engine.backward(d_loss, retain_graph=True)  # without detach it reaches the generator's parameters
            d_engine.step()
            g_engine.backward(d_engine(fake).mean())  # the generator's loss goes through the discriminator
            g_engine.step()
            d_engine.zero_grad()
        return "ok"
    except RuntimeError as err:
        return str(err)
    finally:
        g_engine.destroy()
        d_engine.destroy()


def test_a_stray_backward_names_the_other_engine():
    for message in run_ranks(_gan, world_size=2, args=(True,)):
        assert "gradient of 'weight' arrived outside this engine's backward" in message or \
            "gradient of 'bias' arrived outside this engine's backward" in message, message
        assert "another engine's backward()" in message and "reentrant" not in message
