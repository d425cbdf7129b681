"""``python -m fairseq_moe_infer`` prints the directory to pass to fairseq's ``--user-dir``."""

from . import user_dir

print(user_dir())
