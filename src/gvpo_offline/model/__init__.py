"""The model layer: loading (folders, hub ids, adapters), the one log-prob function, packed rows,
LoRA, torch.distributed (FSDP2, rank-0 loading) and the model folder train hands back."""
