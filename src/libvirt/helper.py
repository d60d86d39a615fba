#!/usr/bin/python3
"""idlecrypt's libvirt helper: one long-lived process that speaks JSON lines.

Why a helper: no Node binding to libvirt has block-job calls (docs/libvirt.md), and running
`virsh` per call costs a process and a new connection each time (about 60 ms here) and
answers in translated text. Debian's python3-libvirt is the C API itself: one connection,
typed parameters (speeds in bytes/s), block-job events, and secrets whose value goes
through this pipe, never through a file or a command line.

Protocol (stdin/stdout, one JSON object per line):
  request   {"id": 1, "op": "domains", ...arguments}
  reply     {"id": 1, "ok": <result>}  or  {"id": 1, "error": {"message": ..., "code": ...}}
  event     {"event": "block-job", "domain": NAME, "disk": "vda", "type": N, "status": N}
            {"event": "lifecycle", "domain": NAME, "type": N, "detail": N}
            {"event": "closed", "reason": N}   (libvirtd went away: the helper reconnects)
            {"event": "reconnected"}           (libvirtd is back; events missed meanwhile are lost)
While libvirtd is away a request fails with {"code": -2, "disconnected": true}.
The first line is {"event": "hello", "uri": ..., "libvirt": N}. End of stdin ends it.
Nothing here logs: a secret's value passes through `secret-define` and is dropped.
"""
import base64
import json
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET

import libvirt

out_lock = threading.Lock()
# Keep the usual prefixes when a definition is written back (libvirt matches by URI anyway).
ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")


def emit(obj):
    line = json.dumps(obj, separators=(",", ":"))
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def quiet_errors(_ctx, _err):
    # libvirt prints every error on stderr by default; ours travel in the replies.
    pass


libvirt.registerErrorHandler(quiet_errors, None)
libvirt.virEventRegisterDefaultImpl()


def event_loop():
    while True:
        libvirt.virEventRunDefaultImpl()


def disk_iothread(el, root):
    """The iothread that serves a disk: its own (virtio-blk, <driver iothread='N'/>) or, for a
    SCSI disk, its virtio-scsi controller's; QEMU's object id is iothreadN. None without one."""
    driver = el.find("driver")
    if driver is not None and driver.get("iothread"):
        return "iothread" + driver.get("iothread")
    target = el.find("target")
    if root is None or target is None or target.get("bus") != "scsi":
        return None
    address = el.find("address")
    index = address.get("controller", "0") if address is not None else "0"
    for c in root.findall("./devices/controller[@type='scsi']"):
        cdriver = c.find("driver")
        if c.get("index", "0") == index and cdriver is not None and cdriver.get("iothread"):
            return "iothread" + cdriver.get("iothread")
    return None


def disk_info(el, root=None):
    """One <disk> element as the fields idlecrypt reads (virsh domblklist's and more)."""
    target = el.find("target")
    source = el.find("source")
    driver = el.find("driver")
    enc = el.find("encryption")
    if enc is None and source is not None:
        enc = source.find("encryption")
    secret = enc.find("secret") if enc is not None else None
    src = None
    if source is not None:
        src = source.get("file") or source.get("dev") or source.get("name") or source.get("volume")
    mirror = el.find("mirror")
    return {
        "target": target.get("dev") if target is not None else None,
        "bus": target.get("bus") if target is not None else None,
        "type": el.get("type"),
        "device": el.get("device"),
        "source": src,
        "format": driver.get("type") if driver is not None else None,
        "cache": driver.get("cache") if driver is not None else None,
        "iothread": disk_iothread(el, root),
        "readonly": el.find("readonly") is not None,
        # A backing image (libvirt's live XML names the chain under <backingStore>; an
        # empty <backingStore/> ends it): its data is copied too, outside the top's allocation.
        "backing": el.find("backingStore/source") is not None,
        "encryption": None
        if enc is None
        else {
            "format": enc.get("format"),
            "engine": enc.get("engine"),
            "secret": secret.get("uuid") if secret is not None else None,
        },
        "mirror": None
        if mirror is None
        else {
            "job": mirror.get("job"),
            "ready": mirror.get("ready"),
            "source": (mirror.find("source").get("file") if mirror.find("source") is not None else mirror.get("file")),
        },
    }


DISCONNECTED = -2


class Disconnected(Exception):
    pass


class Helper:
    def __init__(self, uri):
        self.uri = uri
        self.conn = None
        self.lock = threading.Lock()
        self.connect()

    def connect(self):
        conn = libvirt.open(self.uri)
        conn.setKeepAlive(5, 3)
        conn.registerCloseCallback(self.on_close, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self.on_block_job, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle, None)
        self.conn = conn

    def on_close(self, _conn, reason, _opaque):
        # libvirtd went away (restarted, stopped, crashed). Its block jobs live on in QEMU;
        # reconnect until it is back, as `virsh` users expect a service to.
        with self.lock:
            if self.conn is None:
                return
            self.conn = None
        emit({"event": "closed", "reason": reason})
        threading.Thread(target=self.reconnect, daemon=True).start()

    def reconnect(self):
        delay = 0.2
        while True:
            time.sleep(delay)
            try:
                self.connect()
            except libvirt.libvirtError:
                delay = min(delay * 2, 2.0)
                continue
            emit({"event": "reconnected"})
            return

    @property
    def c(self):
        conn = self.conn
        if conn is None:
            raise Disconnected()
        return conn

    def on_block_job(self, _conn, dom, disk, typ, status, _opaque):
        emit({"event": "block-job", "domain": dom.name(), "disk": disk, "type": typ, "status": status})

    def on_lifecycle(self, _conn, dom, event, detail, _opaque):
        emit({"event": "lifecycle", "domain": dom.name(), "type": event, "detail": detail})

    def alive(self):
        conn = self.conn
        try:
            return conn is not None and conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def dom(self, a):
        return self.c.lookupByName(a["domain"])

    # --- operations -------------------------------------------------------------------

    def op_ping(self, a):
        return True

    def op_domains(self, a):
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        return [
            {"name": d.name(), "uuid": d.UUIDString(), "id": d.ID(), "persistent": bool(d.isPersistent())}
            for d in self.c.listAllDomains(flags)
        ]

    def op_domain(self, a):
        d = self.dom(a)
        return {"name": d.name(), "uuid": d.UUIDString(), "id": d.ID(), "persistent": bool(d.isPersistent()), "active": bool(d.isActive())}

    def op_disks(self, a):
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if a.get("inactive") else 0
        root = ET.fromstring(self.dom(a).XMLDesc(flags))
        return [disk_info(el, root) for el in root.findall("./devices/disk")]

    def op_block_info(self, a):
        capacity, allocation, physical = self.dom(a).blockInfo(a["disk"])
        return {"capacity": capacity, "allocation": allocation, "physical": physical}

    def op_block_stats(self, a):
        rd_req, rd_bytes, wr_req, wr_bytes, _errs = self.dom(a).blockStats(a["disk"])
        return {"rd_req": rd_req, "rd_bytes": rd_bytes, "wr_req": wr_req, "wr_bytes": wr_bytes}

    def op_block_latency(self, a):
        # virDomainBlockStatsFlags: the guest's requests and their total time in QEMU (ns),
        # from query-blockstats' rd/wr/flush _operations and _total_time_ns.
        st = self.dom(a).blockStatsFlags(a["disk"], 0)
        return {k: st.get(k, 0) for k in ("rd_operations", "wr_operations", "flush_operations", "rd_total_times", "wr_total_times", "flush_total_times")}

    def op_job_info(self, a):
        info = self.dom(a).blockJobInfo(a["disk"], libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
        if not info:
            return None
        return {"type": info["type"], "bandwidth": info["bandwidth"], "cur": info["cur"], "end": info["end"]}

    def op_blockcopy(self, a):
        flags = 0
        for f in a.get("flags", []):
            flags |= {"reuse-external": libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT, "transient-job": libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB}[f]
        params = {}
        if a.get("bandwidth"):
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = int(a["bandwidth"])
        if a.get("buf-size"):
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BUF_SIZE] = int(a["buf-size"])
        self.dom(a).blockCopy(a["disk"], a["xml"], params, flags)
        return True

    def op_set_speed(self, a):
        self.dom(a).blockJobSetSpeed(a["disk"], int(a["bytes"]), libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
        return True

    def op_abort(self, a):
        flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT if a.get("pivot") else 0
        if a.get("async"):
            flags |= libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC
        self.dom(a).blockJobAbort(a["disk"], flags)
        return True

    def op_secret_define(self, a):
        xml = a["xml"]
        s = self.c.secretDefineXML(xml)
        try:
            s.setValue(base64.b64decode(a["value"]))
        except Exception:
            s.undefine()
            raise
        return s.UUIDString()

    def op_secret_set_value(self, a):
        # A new value for a secret that exists (virSecretSetValue); it stays defined whatever happens.
        self.c.secretLookupByUUIDString(a["uuid"]).setValue(base64.b64decode(a["value"]))
        return True

    def op_secret_undefine(self, a):
        try:
            self.c.secretLookupByUUIDString(a["uuid"]).undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return False
            raise
        return True

    def op_secret(self, a):
        try:
            s = self.c.secretLookupByUUIDString(a["uuid"])
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return None
            raise
        root = ET.fromstring(s.XMLDesc())
        return {"uuid": s.UUIDString(), "usageType": {libvirt.VIR_SECRET_USAGE_TYPE_NONE: "none", libvirt.VIR_SECRET_USAGE_TYPE_VOLUME: "volume", libvirt.VIR_SECRET_USAGE_TYPE_CEPH: "ceph", libvirt.VIR_SECRET_USAGE_TYPE_ISCSI: "iscsi", libvirt.VIR_SECRET_USAGE_TYPE_TLS: "tls", libvirt.VIR_SECRET_USAGE_TYPE_VTPM: "vtpm"}.get(s.usageType(), str(s.usageType())), "usage": s.usageID(), "private": root.get("private") == "yes", "ephemeral": root.get("ephemeral") == "yes"}

    def op_define(self, a):
        self.c.defineXML(a["xml"])
        return True

    def op_retarget_inactive(self, a):
        """Points the persistent definition's disk `disk` at the encrypted image: its source,
        its format, and an <encryption> naming the secret. Returns the source it replaced.
        The definition is read with VIR_DOMAIN_XML_SECURE so that redefining it keeps what
        the plain dump leaves out (passwords)."""
        d = self.dom(a)
        root = ET.fromstring(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
        for el in root.findall("./devices/disk"):
            t = el.find("target")
            if t is None or t.get("dev") != a["disk"]:
                continue
            old = disk_info(el)["source"]
            el.set("type", "file")
            for child in list(el):
                if child.tag in ("source", "encryption"):
                    el.remove(child)
            src = ET.Element("source", {"file": a["source"]})
            enc = ET.SubElement(src, "encryption", {"format": "luks", "engine": "qemu"})
            ET.SubElement(enc, "secret", {"type": "passphrase", "uuid": a["secret"]})
            el.insert(1, src)
            driver = el.find("driver")
            if driver is None:
                driver = ET.Element("driver", {"name": "qemu"})
                el.insert(0, driver)
            driver.set("type", a["format"])
            self.c.defineXML(ET.tostring(root, encoding="unicode"))
            return old
        raise ValueError("the persistent definition has no disk " + a["disk"])

    def op_xml(self, a):
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if a.get("inactive") else 0
        return self.dom(a).XMLDesc(flags)

    def op_monitor(self, a):
        import libvirt_qemu

        return json.loads(libvirt_qemu.qemuMonitorCommand(self.dom(a), json.dumps(a["command"]), 0))


def main():
    uri = sys.argv[1] if len(sys.argv) > 1 else "qemu:///system"
    # idlecrypt decides when we end (it closes our stdin, or dies and so closes it): a Ctrl-C
    # or a service manager's SIGTERM to the whole process group must not take the connection
    # away while idlecrypt still undoes its run through it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=event_loop, daemon=True).start()
    try:
        h = Helper(uri)
    except libvirt.libvirtError as e:
        emit({"event": "error", "message": str(e), "code": e.get_error_code()})
        sys.exit(1)
    emit({"event": "hello", "uri": h.c.getURI(), "libvirt": h.c.getLibVersion()})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        rid = req.get("id")
        fn = getattr(h, "op_" + str(req.get("op", "")).replace("-", "_"), None)
        try:
            if fn is None:
                raise ValueError("unknown operation " + repr(req.get("op")))
            emit({"id": rid, "ok": fn(req)})
        except Disconnected:
            emit({"id": rid, "error": {"message": "libvirtd is not reachable (reconnecting)", "code": DISCONNECTED, "disconnected": True}})
        except libvirt.libvirtError as e:
            lost = h.conn is None or e.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT) and not h.alive()
            emit({"id": rid, "error": {"message": str(e), "code": e.get_error_code(), "disconnected": bool(lost)}})
        except Exception as e:  # a bad request: say so, keep serving
            emit({"id": rid, "error": {"message": "%s: %s" % (type(e).__name__, e), "code": -1}})


if __name__ == "__main__":
    main()
