import time, torch, sys
from kvengine.engine.linear import small_linear_op; small_linear_op()
nt=int(sys.argv[1]); torch.set_num_threads(nt)
shapes=[(576,576),(192,576),(192,576),(576,576),(1536,576),(1536,576),(576,1536)]
per=sum(n*k for n,k in shapes)
big=torch.empty(per*30)
big.normal_()
mats=[]; off=0
for _ in range(30):
    for n,k in shapes: mats.append(big[off:off+n*k].view(n,k)); off+=n*k
sep=[torch.randn(n,k) for _ in range(30) for (n,k) in shapes]
tot=per*30*4
xs={576:torch.randn(1,576),1536:torch.randn(1,1536)}
op=torch.ops.kvengine.small_linear
def t(ms):
    s=time.perf_counter()
    for m in ms: op(xs[m.shape[1]], m, None)
    return time.perf_counter()-s
for rep in range(4):
    a=t(mats); b=t(sep)
    print(f"threads {nt}: views of one buffer {tot/a/1e9:.1f} GB/s | separate {tot/b/1e9:.1f} GB/s")
