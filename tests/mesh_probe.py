from parallel.mesh import MeshDims, init_parallel
def probe():
    ctx = init_parallel(MeshDims(dp_replicate=1, dp_shard=-1, cp=2, tp=2))
    return (ctx.rank, ctx.dp_rank, ctx.coordinate("cp"), ctx.coordinate("tp"), ctx.coordinate("dp_shard_cp"), ctx.dims)
