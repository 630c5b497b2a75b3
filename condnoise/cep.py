"""One-line CEP for any diffusers training loop (paper Sec. 3): a thin public alias.

    from condnoise import cep
    handle = cep.attach(unet, gamma=1.0, noise="uniform")   # CEP-U on encoder_hidden_states
    ...                                                     # train as usual
    with handle.paused():                                   # no perturbation when sampling
        ...
    handle.remove()

The logic lives in :mod:`condnoise.conditioning.attach` (it shares the CEP noise with the
condnoise trainer's perturbations, :mod:`condnoise.conditioning.noise`).
"""

from condnoise.conditioning.attach import CEPHandle, attach

__all__ = ["CEPHandle", "attach"]
