"""How much of a finding's contrast survives an image tokenizer (encode -> decode).

The demo renders the same patient, pose and film with and without one finding; the finding's signal
is their difference. Passing both through the tokenizer, the retained fraction is the projection of
the reconstructed difference onto the original one, ``<d_rec, d> / <d, d>``: 1 when the tokenizer
keeps the finding exactly, 0 when it erases it (negative: it inverts it). A radiologist's question
"is the effusion still there after tokenization?" as a number per finding.
"""

from __future__ import annotations

import numpy as np

from medim_jax.data import demo_chest
from medim_jax.data.iu_reports import FINDINGS, Finding

# One representative MeSH term per finding, at moderate size, side and zone left to chance.
TERMS = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
         "pneumothorax": "Pneumothorax", "nodule": "Nodule", "opacity": "Consolidation",
         "calcified_granuloma": "Calcified Granuloma"}


def paired_renders(phantom, kind: str, count: int, image_size: int, seed: int):
  """(with, without) uint8 image batches of ``count`` poses."""
  with_finding, without = [], []
  finding = Finding(kind, TERMS[kind], None, None, "moderate", False)
  for i in range(count):
    key = [seed, FINDINGS.index(kind), i]
    with_finding.append(demo_chest.render(phantom, [finding], image_size, np.random.default_rng(key),
                                          pose_rng=np.random.default_rng(key + [1])))
    without.append(demo_chest.render(phantom, [], image_size, np.random.default_rng(key),
                                     pose_rng=np.random.default_rng(key + [1])))
  return np.stack(with_finding), np.stack(without)


def retained_fraction(tokenizer, with_finding, without) -> float:
  """Mean over pairs of <d_rec, d> / <d, d> (pairs whose finding left no trace are skipped)."""
  original = with_finding.astype(np.float64) - without.astype(np.float64)
  recon = (tokenizer.decode(tokenizer.encode(with_finding)).astype(np.float64)
           - tokenizer.decode(tokenizer.encode(without)).astype(np.float64))
  energy = (original ** 2).sum(axis=(1, 2, 3))
  visible = energy > 0
  if not visible.any():
    return float("nan")
  return float(((recon * original).sum(axis=(1, 2, 3))[visible] / energy[visible]).mean())


def finding_visibility(tokenizer, image_size: int, count: int = 1024, seed: int = 0,
                       phantom=None) -> dict[str, float]:
  """Retained fraction per finding over ``count`` poses. One pose's fraction varies a lot (a nodule
  on a rib edge or across a token border), so with 16 poses a nodule's mean moved by 0.17 between
  seeds; with 1,024 the k-means stand-in's six means stay within 0.03 across seeds (on 2 CPU cores:
  about 30 s for the k-means stand-in, 2.5 min for the demo's VQ)."""
  phantom = phantom or demo_chest.ChestPhantom.from_ct(*demo_chest.ct_paths())
  return {kind: retained_fraction(tokenizer, *paired_renders(phantom, kind, count, image_size, seed))
          for kind in FINDINGS}


def difference_sheet(tokenizers: dict, image_size: int, path: str, phantom=None,
                     gain: float = 4.0) -> None:
  """A PNG with one row per finding (one pose): the render with the finding and its reconstructions,
  then the finding itself (with minus without) as each tokenizer passes it on, grey = no change and
  differences amplified ``gain`` times, so one sees what is left of a wide heart or a nodule."""
  from medim_jax import visualize
  phantom = phantom or demo_chest.ChestPhantom.from_ct(*demo_chest.ct_paths())
  pairs = [paired_renders(phantom, kind, 1, image_size, seed=0) for kind in FINDINGS]
  with_finding = np.concatenate([w for w, _ in pairs])
  without = np.concatenate([wo for _, wo in pairs])

  def shown(difference):
    return np.clip(127.5 + gain * difference, 0, 255).astype(np.uint8)

  columns, titles = [with_finding], ["with finding"]
  differences, difference_titles = [shown(with_finding.astype(np.float64) - without)], ["finding"]
  for name, tokenizer in tokenizers.items():
    recon_with = tokenizer.decode(tokenizer.encode(with_finding))
    recon_without = tokenizer.decode(tokenizer.encode(without))
    columns.append(recon_with)
    titles.append(name)
    differences.append(shown(recon_with.astype(np.float64) - recon_without))
    difference_titles.append(f"{name}: finding")
  visualize.comparison_grid(columns + differences, titles + difference_titles, path,
                            row_labels=[TERMS[kind].lower() for kind in FINDINGS])


def main(argv=None) -> None:
  import argparse

  from medim_jax.tokenizers import image as image_tokenizers
  parser = argparse.ArgumentParser(
      description="How much of each demo finding's contrast survives saved image tokenizers "
                  "(e.g. WORKDIR/vq/tokenizer.npz, WORKDIR/shards/tokenizers/image.npz).")
  parser.add_argument("tokenizers", nargs="+", help="saved image tokenizer .npz files")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--pairs", type=int, default=1024, help="renders with / without per finding")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sheet", default="", help="also write the difference sheet PNG here")
  args = parser.parse_args(argv)
  phantom = demo_chest.ChestPhantom.from_ct(*demo_chest.ct_paths())
  tokenizers = {path: image_tokenizers.load_image_tokenizer(path) for path in args.tokenizers}
  print("retained fraction: " + " ".join(FINDINGS))
  for path, tokenizer in tokenizers.items():
    scores = finding_visibility(tokenizer, args.image_size, args.pairs, args.seed, phantom)
    print(" ".join(f"{scores[kind]:.3f}" for kind in FINDINGS) + f"  {path}")
  if args.sheet:
    kinds = {image_tokenizers.VQTokenizer: "VQ", image_tokenizers.PatchKMeansTokenizer: "k-means"}
    titled = {}
    for i, (path, tokenizer) in enumerate(tokenizers.items()):
      title = kinds.get(type(tokenizer), type(tokenizer).__name__)
      titled[title if title not in titled else f"{title} {i + 1}"] = tokenizer
    difference_sheet(titled, args.image_size, args.sheet, phantom)
    print(f"difference sheet: {args.sheet} (columns: " + ", ".join(
        f"{title} = {path}" for title, path in zip(titled, tokenizers)) + ")")


if __name__ == "__main__":
  main()
