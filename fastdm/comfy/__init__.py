"""fastdm inside ComfyUI: a node pack on the classic contract (see :mod:`fastdm.comfy.nodes`).

``fastdm-comfy install COMFYUI_DIR`` puts a small folder ``custom_nodes/fastdm_nodes/`` into a ComfyUI
(its ``__init__.py`` re-exports the mappings below; fastdm itself is installed in ComfyUI's Python);
``--uninstall`` removes it. Imports inside this package are relative, so ComfyUI may import it under
any module name.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
