"""The CNN detector family: torchvision Faster R-CNN, RetinaNet and FCOS with ResNet-FPN.

``config`` (torch-free): :class:`CnnModelConfig`; ``build``: model / criterion / post-processing
builders; ``detector``: the adapter between replic batches and torchvision models. See
docs/cnn_detectors.md for the recipe and what differs from MMDetection.
"""
