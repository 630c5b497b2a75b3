"""``scenes``: procedural captioned scenes of Fashion-MNIST items (the text counterpart of
Fashion-MNIST for the paper's text-to-image experiments, section 2 / Table 1).

Splits: ``train`` (60,000 scenes, items from Fashion-MNIST train), ``test`` (10,000, items
from Fashion-MNIST test: no test item is ever in training), ``test-novel`` (10,000, items
from Fashion-MNIST test, every item in a held-out (class, colour) pair). Spec ``scenes``
(seed 0, the canonical dataset) or ``scenes:seed=N``; RGB, 32 x 32 (``image_size`` 64
renders the same scenes at twice the resolution). Generated vectorised and cached in
``$CONDNOISE_CACHE/scenes/`` (default ``~/.cache/condnoise``).

Rules (they make every attribute recoverable from the pixels):

- **Items.** 1-3 per scene (count uniform). Each item's pixels are one Fashion-MNIST image
  of its class, resized to its box (10 px small / 16 px large at 32 x 32) and scaled so its
  brightest pixel is 1. Items come from a *pool*: per class the 30% of the split's images
  that a ridge classifier (fitted on Fashion-MNIST train at 10 x 10 px) scores with the
  largest margin, so the class is recognisable at the smallest size. Class uniform; items 2
  and 3 repeat item 1's class and colour with probability 0.25 (so captions count "two red
  sneakers"); the image is uniform within the class pool.
- **Colour.** 8 tints (red, orange, yellow, green, cyan, blue, purple, white) multiplied
  by the item's intensity and blended over the background (``bg (1 - a) + tint a``).
  Background: black (p = 0.5), else gray, brown or navy (darker than every tint).
- **Layout.** Positions left / right / top / bottom / centre are fixed boxes of a plus
  shape (``vocab.CORNER``): distinct positions per scene, boxes never overlap, so the
  position and size of every item follow from where its pixels are. Valid layouts
  (``vocab.LAYOUTS``, 36) are all non-overlapping sets; a large centre item stands alone,
  three-item scenes are all small. Within an item count a layout is drawn with weight
  2 ** (number of large items).
- **Held out.** Class c never appears in train / test in colour ``(3 c) mod 8``
  (T-shirt/top red, Trouser green, Pullover purple, Dress orange, Coat cyan, Sandal white,
  Shirt yellow, Sneaker blue, Bag red, Ankle boot green); test-novel shows only those 10
  pairs. Guaranteed by construction (the colour is drawn from the other 7).
- **Captions** come from the grammar in ``captions.py`` (synonyms, varied order, counts
  merging items of equal class, colour and size); ``parse_caption`` inverts it exactly.
- **Masks**: class + 1 where an item's intensity exceeds 0.1, else 0. **Canny**: OpenCV
  on the uint8 RGB render (thresholds 100 / 200 by default).
- **Determinism.** Draws come from the shared counter-based ``condnoise.rng`` (streams
  ``scenes/{split}/layout`` and ``scenes/{split}/caption``, counters scene index and draw):
  scene i uses row i of a uniform matrix, so any prefix of a split is identical to the full split's.
"""

from condnoise.data.scenes.captions import CaptionParseError, parse_caption, render_caption
from condnoise.data.scenes.dataset import Scenes, parse_options
from condnoise.data.scenes.vocab import HELD_OUT, vocabulary

__all__ = [
    "HELD_OUT", "CaptionParseError", "Scenes", "parse_caption", "parse_options",
    "render_caption", "vocabulary",
]  # fmt: skip
