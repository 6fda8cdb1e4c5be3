"""ShapesWorld: a miniature world to train and benchmark EasyRef end to end on a CPU (docs/SHAPESWORLD.md)."""
