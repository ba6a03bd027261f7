"""The PyTorch VQ checkpoint converter against a taming-style VQGAN written here in torch."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medim_jax.convert import vq_checkpoint
from medim_jax.models import vq

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

CFG = vq.VQConfig(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                  z_channels=8, embed_dim=4, codebook_size=16, num_groups=4, l2_normalize=False)


def norm(c):
  return nn.GroupNorm(CFG.num_groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)
    k = self.k(y).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
    v = self.v(y).reshape(b, c, h * w)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + self.proj_out(out)


class Resample(nn.Module):
  def __init__(self, c, down):
    super().__init__()
    self.down = down
    self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

  def forward(self, x):
    if self.down:
      return self.conv(F.pad(x, (0, 1, 0, 1)))
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class TamingVQ(nn.Module):
  """taming-transformers' VQModel layout (Chameleon's tokenizer), small."""

  def __init__(self):
    super().__init__()
    widths = [CFG.channels * m for m in CFG.channel_mult]
    n = len(widths)
    enc, dec = nn.Module(), nn.Module()
    enc.conv_in = nn.Conv2d(3, CFG.channels, 3, padding=1)
    enc.down = nn.ModuleList()
    for i in range(n):
      level = nn.Module()
      cin = CFG.channels if i == 0 else widths[i - 1]
      level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else widths[i], widths[i])
                                   for j in range(CFG.num_res_blocks)])
      level.attn = nn.ModuleList([AttnBlock(widths[i]) for _ in range(CFG.num_res_blocks)]
                                 if i in CFG.attention_levels else [])
      if i < n - 1:
        level.downsample = Resample(widths[i], down=True)
      enc.down.append(level)
    enc.mid, enc.norm_out = Mid(widths[-1]), norm(widths[-1])
    enc.conv_out = nn.Conv2d(widths[-1], CFG.z_channels, 3, padding=1)
    dec.conv_in = nn.Conv2d(CFG.z_channels, widths[-1], 3, padding=1)
    dec.mid = Mid(widths[-1])
    ups = []
    for i in range(n):
      level = nn.Module()
      cin = widths[min(i + 1, n - 1)]
      level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else widths[i], widths[i])
                                   for j in range(CFG.num_res_blocks + 1)])
      level.attn = nn.ModuleList([AttnBlock(widths[i]) for _ in range(CFG.num_res_blocks + 1)]
                                 if i in CFG.attention_levels else [])
      if i > 0:
        level.upsample = Resample(widths[i], down=False)
      ups.append(level)
    dec.up = nn.ModuleList(ups)
    dec.norm_out, dec.conv_out = norm(widths[0]), nn.Conv2d(widths[0], 3, 3, padding=1)
    self.encoder, self.decoder = enc, dec
    self.quant_conv = nn.Conv2d(CFG.z_channels, CFG.embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(CFG.embed_dim, CFG.z_channels, 1)
    self.quantize = nn.Module()
    self.quantize.embedding = nn.Embedding(CFG.codebook_size, CFG.embed_dim)

  @staticmethod
  def _level(level, x):
    for j, block in enumerate(level.block):
      x = block(x)
      if len(level.attn):
        x = level.attn[j](x)
    return x

  def encode_latents(self, x):
    e = self.encoder
    x = e.conv_in(x)
    for level in e.down:
      x = self._level(level, x)
      if hasattr(level, "downsample"):
        x = level.downsample(x)
    return self.quant_conv(e.conv_out(F.silu(e.norm_out(e.mid(x)))))

  def decode_latents(self, z):
    d = self.decoder
    x = d.mid(d.conv_in(self.post_quant_conv(z)))
    for level in reversed(d.up):
      x = self._level(level, x)
      if hasattr(level, "upsample"):
        x = level.upsample(x)
    return d.conv_out(F.silu(d.norm_out(x)))


def randomised(module, seed):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=generator))
  return module


def jax_model(params, cfg=CFG):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, params)


def test_converted_taming_checkpoint_reproduces_the_torch_forward(tmp_path):
  reference = randomised(TamingVQ(), 0).eval()
  path = str(tmp_path / "vqgan.ckpt")
  torch.save({"state_dict": {**reference.state_dict(), "loss.discriminator.w": torch.zeros(2)}}, path)
  params = vq_checkpoint.load(path, CFG)
  model = jax_model(params)

  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    latents = reference.encode_latents(torch.from_numpy(images).permute(0, 3, 1, 2))
    recon = reference.decode_latents(latents)
  ours = nnx.jit(lambda m, x: m.encode_latents(x))(model, jnp.asarray(images))
  np.testing.assert_allclose(ours, latents.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
  decoded = nnx.jit(lambda m, z: m.decode_latents(z))(model, ours)
  np.testing.assert_allclose(decoded, recon.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-3)

  codebook = reference.quantize.embedding.weight.detach().numpy()
  flat = latents.permute(0, 2, 3, 1).reshape(-1, CFG.embed_dim).numpy()
  expected = ((flat[:, None] - codebook) ** 2).sum(-1).argmin(-1).reshape(2, 4, 4)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(images)),
                                expected)


def to_llamagen(key, levels):
  key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", key)
  mid = {"block_1": "0", "attn_1": "1", "block_2": "2"}
  key = re.sub(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.",
               lambda m: f"{m[1]}.mid.{mid[m[2]]}.", key)
  key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.conv_blocks.{levels - 1 - int(m[1])}.res.", key)
  return re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.conv_blocks.{levels - 1 - int(m[1])}.", key)


def test_llamagen_names_load_to_the_same_parameters():
  state = {k: v.numpy() for k, v in randomised(TamingVQ(), 1).state_dict().items()}
  llamagen = {to_llamagen(k, len(CFG.channel_mult)): v for k, v in state.items()}
  assert any(k.startswith("decoder.conv_blocks.0.attn") for k in llamagen)  # coarsest level first
  llamagen["quantize.codebook_used"] = np.zeros(3)
  a, b = vq_checkpoint.convert(state, CFG), vq_checkpoint.convert(llamagen, CFG)
  for (pa, xa), (pb, xb) in zip(sorted(vq_checkpoint._flat(a).items()), sorted(vq_checkpoint._flat(b).items())):
    assert pa == pb
    np.testing.assert_array_equal(xa, xb)


def test_a_checkpoint_for_another_config_is_refused_with_the_mismatches():
  state = {k: v.numpy() for k, v in randomised(TamingVQ(), 2).state_dict().items()}
  wider = dataclasses.replace(CFG, codebook_size=32)
  with pytest.raises(ValueError, match=r"quantize.embedding.weight: shape \(16, 4\) here, \(32, 4\)"):
    vq_checkpoint.convert(state, wider)
  del state["decoder.conv_out.bias"]
  with pytest.raises(ValueError, match="decoder/conv_out/bias: not in the checkpoint"):
    vq_checkpoint.convert(state, CFG)
