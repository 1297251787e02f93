"""DC-Gen core: DC-AE, checkpoint formats and key maps, FLUX patching, LoRA, schedules, tiling.

Importable with torch alone; the modules that touch ComfyUI import it inside their functions.
"""
