"""kdlib: measure a transformer text classifier and make it smaller and faster by distillation.

Modules, one concept each: :mod:`kdlib.data`, :mod:`kdlib.models`, :mod:`kdlib.predictors`,
:mod:`kdlib.benchmark`, :mod:`kdlib.distill`, :mod:`kdlib.optimize`, :mod:`kdlib.results`,
:mod:`kdlib.plots`, :mod:`kdlib.modelcard`, :mod:`kdlib.profiles` and :mod:`kdlib.run`.
"""

__version__ = "0.1.0"
