"""pycaffe's Detector: a Net scoring windows of images, each window cropped (with optional
context around it, as R-CNN's feature extraction) and warped to the net's input size."""

import numpy as np

from espresso import io
from espresso.classifier import configured_transformer
from espresso.net import TEST, Net


class Detector(Net):
    """Net (TEST phase, with the trained weights) for windowed detection.

    mean, input_scale, raw_scale, channel_swap: as io.Transformer's settings; context_pad: the
    border, in input pixels, that shows context around each window."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[{'window', 'prediction', 'filename'}] for each window of each (image file, windows)
        pair; a window is (ymin, xmin, ymax, xmax)."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        crops = []
        for name, windows in images_windows:
            image = io.load_image(name).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        name = self.inputs[0]
        batch = np.array([self.transformer.preprocess(name, crop) for crop in crops], np.float32)
        predictions = iter(self.forward_all(**{name: batch})[self.outputs[0]])
        return [{"window": window, "prediction": next(predictions), "filename": image}
                for image, windows in images_windows for window in windows]

    def detect_selective_search(self, image_fnames):
        """detect_windows over Selective Search's proposals (needs the
        selective_search_ijcv_with_python package and MATLAB, as in Caffe)."""
        import os

        import selective_search_ijcv_with_python as selective_search

        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows))

    def crop(self, im, window):
        """The window (ymin, xmin, ymax, xmax) of an H x W x K image; with context_pad, the
        window grown so that context_pad input pixels of context surround it, out-of-image parts
        filled with the mean (Caffe's rule; the box is rounded to whole pixels before slicing)."""
        window = np.asarray(window)
        if not self.context_pad:
            return im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        size = self.blobs[self.inputs[0]].width  # a square input, as Caffe assumes
        scale = size / (1.0 * size - self.context_pad * 2)
        half = (np.array([window[2] - window[0], window[3] - window[1]], float) + 1) / 2.0
        centre = window[:2] + half
        box = np.round(np.tile(centre, 2) + scale * np.concatenate([-half, half]))
        scale_hw = size / (box[2:] - box[:2] + 1)
        pad_y, pad_x = (int(round(max(0, -b) * s)) for b, s in zip(box[:2], scale_hw))
        h, w = im.shape[:2]
        box = np.clip(box, 0.0, [h, w, h, w])
        crop_h, crop_w = (int(round(c * s)) for c, s in zip(box[2:] - box[:2] + 1, scale_hw))
        crop_h, crop_w = min(crop_h, size - pad_y), min(crop_w, size - pad_x)
        box = box.astype(int)
        context = io.resize_image(im[box[0]:box[2], box[1]:box[3]], (crop_h, crop_w))
        crop = np.ones(self.crop_dims, np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return crop

    def configure_crop(self, context_pad):
        """Set the crop size (the input's, as H x W x K) and the context; with context, the mean
        in the image's own space (before transpose, channel swap and raw scale) fills the
        out-of-image part of a crop."""
        name = self.inputs[0]
        inverse = np.argsort(self.transformer.transpose[name])
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, np.float32)
            return
        crop_mean = mean.copy().transpose(inverse)
        swap = self.transformer.channel_swap.get(name)
        if swap is not None:
            crop_mean = crop_mean[:, :, np.argsort(swap)]
        raw_scale = self.transformer.raw_scale.get(name)
        self.crop_mean = crop_mean / raw_scale if raw_scale is not None else crop_mean
