"""Stand-in for `torchvision.utils.save_image` in dsrun's copy of the GAN example (torchvision has no wheel
for the torch build the tests run on): writes the image batch with torch.save instead of a PNG grid."""
import torch


def save_image(tensor, fp, normalize=False, **kwargs):
    torch.save(tensor.detach().cpu(), fp)
