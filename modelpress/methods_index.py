"""The one place that imports every method module so each registers itself."""
from .quant.algos import rtn  # noqa: F401
from .quant.algos.gptq import method as _gptq_method  # noqa: F401
from .quant.algos.awq import method as _awq_method  # noqa: F401
from .quant.algos.smoothquant import method as _smoothquant_method  # noqa: F401
from .quant.algos.llm_int8 import method as _llm_int8_method  # noqa: F401
from .quant.algos.ptq import method as _ptq_method  # noqa: F401
from .sparsity.activation import method as _activation_sparsity_method  # noqa: F401
from .sparsity.structured import method as _structured_method  # noqa: F401
from .sparsity.algos import magnitude as _magnitude_method  # noqa: F401
from .sparsity.algos.wanda import method as _wanda_method  # noqa: F401
from .sparsity.algos.sparsegpt import method as _sparsegpt_method  # noqa: F401
from .sparsity.moe import method as _moe_method  # noqa: F401
