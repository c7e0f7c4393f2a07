"""Scoring generated images the way the paper does: CLIP score, PickScore, HPSv2 (text-image scorers), FID and KID
(InceptionV3 features). Each scorer loads upstream weight files from one folder (`--weights`), never downloads."""
