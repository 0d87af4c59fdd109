"""remap_tf: REMAP global image descriptors (Husain & Bober, IEEE TIP 2019) in Keras 3."""
