"""Floating-point operations of one forward pass, counted from a Keras model's layers.

    flops = forward_flops(model, height=1024, width=1024)       # one 1024x1024 image (batch of 1)
    per_megapixel = flops / (1024 * 1024 / 1e6)

What counts: a multiply-add is 2 FLOPs, and only the layers that do nearly all of the arithmetic are
counted, at inference:
- Conv2D: output pixels x output channels x kernel height x kernel width x input channels
  multiply-adds (a 1x1 convolution is the same with a 1x1 kernel);
- Conv2DTranspose: input pixels x input channels x kernel area x output channels multiply-adds
  (every input pixel spreads its kernel over the output), i.e. the output pixels / stride^2 times
  the same product;
- Dense: input features x units multiply-adds per position;
- BatchNormalization: one multiply-add per element (at inference it is a per-channel scale and shift).
Biases, activations, pooling, concatenation, dropout (off at inference) and the softmax are not
counted: in an FC-DenseNet they are well under 1% of the total.
"""

import numpy as np

MULTIPLY_ADD = 2  # FLOPs: one multiply and one add


def layer_shapes(model, height, width):
    """{layer name: (input shape, output shape)} of every layer for one height x width image."""
    import keras

    probed = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in probed] + [layer.input for layer in probed])
    specs = probe.compute_output_spec(keras.KerasTensor((1, height, width, model.input_shape[-1])))
    count = len(probed)
    return {layer.name: (_shape(specs[count + index]), _shape(specs[index])) for index, layer in enumerate(probed)}


def _shape(spec):
    """A tensor's shape, or a list of them for a layer of several inputs (a concatenation)."""
    return [tuple(part.shape) for part in spec] if isinstance(spec, (list, tuple)) else tuple(spec.shape)


def layer_multiply_adds(layer, input_shape, output_shape):
    """Multiply-adds of one layer on its (batch 1) input and output shapes; 0 for a layer not counted."""
    from keras import layers

    output_positions = int(np.prod(output_shape[1:-1]))
    if isinstance(layer, layers.Conv2DTranspose):
        kernel_height, kernel_width, filters, channels = layer.kernel.shape
        input_positions = int(np.prod(input_shape[1:-1]))
        return input_positions * channels * kernel_height * kernel_width * filters
    if isinstance(layer, layers.Conv2D):
        kernel_height, kernel_width, channels, filters = layer.kernel.shape
        return output_positions * filters * kernel_height * kernel_width * channels
    if isinstance(layer, layers.Dense):
        channels, units = layer.kernel.shape
        return output_positions * channels * units
    if isinstance(layer, layers.BatchNormalization):
        return int(np.prod(output_shape[1:]))
    return 0


def forward_flops(model, height, width):
    """FLOPs of one forward pass of `model` on one height x width image (see the module's docstring)."""
    shapes = layer_shapes(model, height, width)
    return MULTIPLY_ADD * sum(layer_multiply_adds(layer, *shapes[layer.name])
                              for layer in model.layers if layer.name in shapes)
