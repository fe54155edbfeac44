"""pycaffe's Classifier: a Net that takes H x W x K images and returns class probabilities,
with pycaffe's preprocessing (resize, crops, transpose, scales, mean)."""

import numpy as np

from espresso import io
from espresso.net import TEST, Net


def configured_transformer(net, mean, input_scale, raw_scale, channel_swap):
    """A Transformer for the net's first input: H x W x K -> K x H x W and the options given."""
    name = net.inputs[0]
    transformer = io.Transformer({name: net.blobs[name].data.shape})
    transformer.set_transpose(name, (2, 0, 1))
    for setting, value in (("set_mean", mean), ("set_input_scale", input_scale),
                           ("set_raw_scale", raw_scale), ("set_channel_swap", channel_swap)):
        if value is not None:
            getattr(transformer, setting)(name, value)
    return transformer


class Classifier(Net):
    """Net (TEST phase, with the trained weights) for image classification.

    image_dims: the H x W images are resized to before cropping (default: the input's size);
    mean, input_scale, raw_scale, channel_swap: as io.Transformer's settings."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or not len(image_dims) else image_dims

    def predict(self, inputs, oversample=True):
        """N x C class probabilities of N H x W x K images: averaged over the 10 crops of
        io.oversample (corners, centre, mirrored) when oversample, else of the centre crop."""
        images = np.zeros((len(inputs), *self.image_dims, inputs[0].shape[2]), np.float32)
        for i, image in enumerate(inputs):
            images[i] = io.resize_image(image, self.image_dims)
        if oversample:
            images = io.oversample(images, self.crop_dims)
        else:
            centre = np.array(self.image_dims) / 2.0
            top, bottom = (centre - self.crop_dims / 2.0).astype(int), (centre + self.crop_dims / 2.0).astype(int)
            images = images[:, top[0]:bottom[0], top[1]:bottom[1], :]
        name = self.inputs[0]
        batch = np.array([self.transformer.preprocess(name, image) for image in images], np.float32)
        predictions = self.forward_all(**{name: batch})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape(len(predictions) // 10, 10, -1).mean(1)
        return predictions
