"""Networks written for other tools, turned into cnncompile networks (``torch_fx``: torch.nn modules).

Nothing here imports torch until a torch module is actually given.
"""
