#!/usr/bin/env python3
"""QEMU 7.2: a `copy-mode=write-blocking` mirror into NBD whose connection is cut mid-copy while
writes go through the mirrored device can corrupt QEMU's heap and kill the source VM
("malloc(): unaligned fastbin chunk detected"). Seen in 6 of 65 runs with writes and a cut after
about 1 MB, in 0 of 40 with `copy-mode=background` (2026-11-28, Debian 12 qemu 1:7.2+dfsg-7+deb12u18).
Why trustmig mirrors in background mode by default (spec/qemu.md §5).

usage: active-mirror-crash.py CUT_BYTES write-blocking|background w|n qemu|nbd
prints ALIVE, or DIED when the source QEMU crashed. Needs qemu-system-x86_64 and qemu-utils.
"""
import socket, json, time, sys, subprocess, os
class Q:
    def __init__(s, path):
        s.s=socket.socket(socket.AF_UNIX); 
        for i in range(100):
            try: s.s.connect(path); break
            except Exception: time.sleep(0.05)
        s.f=s.s.makefile('rw'); s.f.readline(); s.ev=[]
        s.x('qmp_capabilities')
    def x(s, cmd, **args):
        s.f.write(json.dumps({'execute':cmd,'arguments':args})+'\n'); s.f.flush()
        while True:
            r=json.loads(s.f.readline())
            if 'event' in r: s.ev.append(r); continue
            if 'error' in r: raise Exception(cmd+': '+str(r['error']))
            return r['return']
import tempfile, threading
D=tempfile.mkdtemp()
cut=int(sys.argv[1]); mode=sys.argv[2]; writes=sys.argv[3]=='w'; server=sys.argv[4]
for f in ['s4.qcow2','d4.qcow2']:
    subprocess.run(['qemu-img','create','-q','-f','qcow2',D+'/'+f,'16M'],check=True)
subprocess.run(['qemu-io','-f','qcow2','-c','write -P 0x11 0 4M','-c','write -P 0x22 8M 4M',D+'/s4.qcow2'],check=True,capture_output=True)
common=['qemu-system-x86_64','-accel','tcg','-m','64','-nodefaults','-display','none']
for p in ['nbd4.sock','relay4.sock']:
    try: os.unlink(D+'/'+p)
    except: pass
src=subprocess.Popen(common+['-blockdev','driver=qcow2,node-name=d0,file.driver=file,file.filename='+D+'/s4.qcow2','-device','virtio-blk-pci,drive=d0,id=vd0,addr=0x5','-qmp','unix:'+D+'/s4.qmp,server=on,wait=off','-qmp','unix:'+D+'/s4b.qmp,server=on,wait=off'],stdout=open(D+'/s4.log','w'),stderr=subprocess.STDOUT)
if server=='qemu':
    dst=subprocess.Popen(common+['-qmp','unix:'+D+'/d4.qmp,server=on,wait=off','-incoming','defer','-S'],stdout=open(D+'/d4.log','w'),stderr=subprocess.STDOUT)
    time.sleep(0.4); qd=Q(D+'/d4.qmp')
    qd.x('blockdev-add', driver='qcow2', **{'node-name':'d0'}, file={'driver':'file','filename':D+'/d4.qcow2'})
    qd.x('device_add', driver='virtio-blk-pci', drive='d0', id='vd0', addr='0x5')
    qd.x('nbd-server-start', addr={'type':'unix','data':{'path':D+'/nbd4.sock'}})
    qd.x('block-export-add', type='nbd', id='e0', **{'node-name':'d0'}, name='d0', writable=True)
else:
    dst=subprocess.Popen(['qemu-nbd','-f','qcow2','-x','d0','-k',D+'/nbd4.sock',D+'/d4.qcow2'])
    time.sleep(0.4)
time.sleep(0.1)
# relay: cut after `cut` bytes client->server
ls=socket.socket(socket.AF_UNIX); ls.bind(D+'/relay4.sock'); ls.listen(1)
def relay():
    c,_=ls.accept(); s=socket.socket(socket.AF_UNIX); s.connect(D+'/nbd4.sock')
    n=[0]; done=threading.Event()
    def up():
        while not done.is_set():
            b=c.recv(65536)
            if not b: break
            if n[0]+len(b)>=cut:
                s.sendall(b[:max(0,cut-n[0])]); done.set(); break
            s.sendall(b); n[0]+=len(b)
        done.set()
    def down():
        while not done.is_set():
            try: b=s.recv(65536)
            except: break
            if not b: break
            try: c.sendall(b)
            except: break
        done.set()
    threading.Thread(target=up,daemon=True).start(); threading.Thread(target=down,daemon=True).start()
    done.wait()
    c.close(); s.close()
threading.Thread(target=relay,daemon=True).start()
time.sleep(0.3)
qs=Q(D+'/s4.qmp'); qw=Q(D+'/s4b.qmp')
stop=False
def w():
    k=0
    while not stop:
        try: qw.x('human-monitor-command', **{'command-line':'qemu-io -d vd0/virtio-backend "write -P %d %d 64k"'%(k%250+1,(k*7%200)*65536)})
        except Exception as e: return
        k+=1; time.sleep(0.01)
if writes: threading.Thread(target=w,daemon=True).start()
try:
    qs.x('blockdev-add', driver='nbd', **{'node-name':'n0'}, server={'type':'unix','path':D+'/relay4.sock'}, export='d0')
    qs.x('blockdev-mirror', **{'job-id':'m0'}, device='d0', target='n0', sync='full', **{'copy-mode':mode}, **{'auto-dismiss':False})
except Exception as e: print('setup err', e)
time.sleep(1.0)
try:
    print('jobs', qs.x('query-jobs'))
    try: qs.x('block-job-cancel', device='m0', force=True)
    except Exception as e: pass
    time.sleep(0.2)
    try: qs.x('job-dismiss', id='m0')
    except Exception: pass
    qs.x('blockdev-del', **{'node-name':'n0'})
    print('ALIVE', qs.x('query-status')['status'])
except Exception as e:
    print('QEMU DIED', e)
stop=True
src.kill(); dst.kill(); time.sleep(0.2)
l=open(D+'/s4.log').read()
print([x for x in l.splitlines() if 'malloc' in x or 'ssert' in x or 'free' in x][:3])
