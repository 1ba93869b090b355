"""Finding VMs: libvirt status files, drop-ins, and the directory watch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestagent.host import dropins, libvirt
from guestagent.host.dirwatch import DirWatch
from guestagent.host.dropins import DropinError, parse_dropin
from guestagent.host.libvirt import StatusError, parse_status

DATA = Path(__file__).with_name("data")
STATUS = (DATA / "libvirt-status.xml").read_text()  # recorded from libvirt 9.0.0 here


def test_real_status_file_gives_pid_vcpus_channel():
    vm = parse_status(STATUS, "x.xml")
    assert vm.name == "libvirt:ga-test-353aa656" and vm.source == "x.xml"
    assert vm.pid == 24641
    assert vm.vcpus == ((0, 24647), (1, 24648))
    assert vm.channel == "/var/lib/guestagent-test/ga-test-353aa656/hints.sock"
    # The test command channel beside it is not the hints channel.
    assert "ctl" not in vm.channel
    assert vm.region is None  # a channel is preferred over the shmem beside it
    assert vm.accel == "tcg" and vm.served and vm.transport() == "channel"
    assert vm.qmp is None  # libvirt holds the monitor itself


def _without_channel(text: str) -> str:
    start = text.index("<channel type='unix'>\n        <source mode='bind' path='/var/lib/"
                       "guestagent-test/ga-test-353aa656/hints.sock'")
    end = text.index("</channel>", start) + len("</channel>")
    return text[:start] + text[end:]


def test_shmem_only_domain_is_served_over_the_region():
    vm = parse_status(_without_channel(STATUS))
    assert vm.channel is None and vm.region == "/dev/shm/ga-test-353aa656-hints"
    assert vm.transport() == "region"


def test_domain_without_hints_is_listed_not_served():
    text = _without_channel(STATUS).replace("ivshmem-plain", "ivshmem-doorbell")
    vm = parse_status(text)
    assert not vm.served and vm.transport() == "none"


def test_kvm_domain():
    assert parse_status(STATUS.replace("<domain type='qemu'", "<domain type='kvm'")
                        ).accel == "kvm"


@pytest.mark.parametrize("text, message", [
    ("<oops", "not XML"),
    ("<domain/>", "expected <domstatus>"),
    ("<domstatus pid='x'><domain><name>a</name></domain></domstatus>", "not a number"),
    ("<domstatus pid='0'><domain><name>a</name></domain></domstatus>", "not a pid"),
    ("<domstatus pid='5'/>", "no <domain>"),
    ("<domstatus pid='5'><domain/></domstatus>", "no <name>"),
])
def test_bad_status_documents_say_why(text, message):
    with pytest.raises(StatusError, match=message):
        parse_status(text)


def test_hostile_shmem_names_name_no_file():
    text = _without_channel(STATUS).replace("<shmem name='ga-test-353aa656-hints'>",
                                            "<shmem name='../../etc/passwd'>")
    assert parse_status(text).region is None


def test_vcpus_without_pid_or_index_are_skipped():
    text = STATUS.replace("<vcpu id='1' pid='24648'/>", "<vcpu id='x' pid='1'/><vcpu id='2'/>")
    assert parse_status(text).vcpus == ((0, 24647),)


def test_scan_reads_every_status_file_and_reports_bad_ones(tmp_path):
    (tmp_path / "a.xml").write_text(STATUS)
    (tmp_path / "b.xml").write_text("<junk")
    (tmp_path / "a.pid").write_text("24641")
    (tmp_path / ".a.xml.new").write_text("<junk")
    result = libvirt.scan(str(tmp_path))
    assert [v.name for v in result.vms] == ["libvirt:ga-test-353aa656"]
    assert len(result.errors) == 1 and "b.xml: not XML" in result.errors[0]
    assert libvirt.scan(str(tmp_path / "missing")).vms == ()


def test_dropin_with_qmp_and_channel():
    vm = parse_dropin("vm1", 'qmp = "/run/vm1.qmp"\nchannel = "/run/vm1.sock"\nlisten = true\n',
                      "vm1.toml")
    assert (vm.name, vm.qmp, vm.channel, vm.channel_listen, vm.pid) == (
        "dropin:vm1", "/run/vm1.qmp", "/run/vm1.sock", True, None)
    assert vm.accel == "unknown"


def test_dropin_with_pidfile_and_region():
    vm = parse_dropin("vm2", 'pidfile = "/run/q.pid"\nregion = "/dev/shm/r"\naccel = "kvm"\n',
                      "vm2.toml", read_pidfile=lambda path: 77)
    assert (vm.pid, vm.region, vm.accel) == (77, "/dev/shm/r", "kvm")


def test_dropin_names_iothreads_by_their_qemu_ids():
    vm = parse_dropin("vm3", 'pid = 5\nchannel = "/c"\niothreads = ["io0", "disk-1"]\n', "f")
    assert vm.iothread_ids == ("io0", "disk-1")


def test_libvirt_iothreads_are_named_as_libvirt_names_them_for_qemu():
    # The status file has no iothread tids: libvirt starts QEMU with
    # -object iothread,id=iothreadN, which QEMU names "IO iothreadN".
    assert parse_status(STATUS).iothread_ids == ()
    counted = STATUS.replace("<vcpu placement='static'>2</vcpu>",
                             "<vcpu placement='static'>2</vcpu><iothreads>2</iothreads>", 1)
    assert parse_status(counted).iothread_ids == ("iothread1", "iothread2")
    listed = counted.replace("<iothreads>2</iothreads>", "<iothreads>2</iothreads><iothreadids>"
                             "<iothread id='4'/><iothread id='7'/></iothreadids>", 1)
    assert parse_status(listed).iothread_ids == ("iothread4", "iothread7")


@pytest.mark.parametrize("name, text, message", [
    ("vm", 'qmp = "/q"\nbogus = 1\n', "bogus: unknown key"),
    ("vm", "qmp = 5\n", "qmp: must be str"),
    ("vm", 'pid = true\n', "pid: must be int"),
    ("vm", 'pid = -3\n', "pid: must be positive"),
    ("vm", 'channel = "/c"\n', "exactly one of qmp"),
    ("vm", 'qmp = "/q"\npid = 4\n', "exactly one of qmp"),
    ("vm", 'qmp = "/q"\nchannel = "/c"\nregion = "/r"\n', "not both"),
    ("vm", 'qmp = "/q"\nregion = "/r"\nlisten = true\n', "listen applies"),
    ("vm", 'qmp = "/q"\naccel = "hvf"\n', "accel"),
    ("vm", 'qmp = ""\n', "non-empty path"),
    ("vm", 'qmp = "/q"\niothreads = "io0"\n', "iothreads: must be list"),
    ("vm", 'qmp = "/q"\niothreads = ["a", "a"]\n', "distinct iothread ids"),
    ("vm", 'qmp = "/q"\niothreads = ["../x"]\n', "distinct iothread ids"),
    ("vm", "qmp = [\n", "."),  # the parser's own words differ by version
    ("../x", 'qmp = "/q"\n', "not a VM name"),
])
def test_bad_dropins_say_why(name, text, message):
    with pytest.raises(DropinError, match=message):
        parse_dropin(name, text, "f.toml")


def test_dropin_scan_skips_bad_files_and_serves_the_rest(tmp_path):
    (tmp_path / "good.toml").write_text('qmp = "/run/g.qmp"\nchannel = "/run/g.sock"\n')
    (tmp_path / "bad.toml").write_text("qmp = 1\n")
    (tmp_path / "latin1.toml").write_bytes(b'qmp = "\xe9"\n')
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "nopid.toml").write_text('pidfile = "/nonexistent/q.pid"\n')
    result = dropins.scan(str(tmp_path))
    assert [v.name for v in result.vms] == ["dropin:good"]
    errors = "\n".join(result.errors)
    assert "bad.toml: qmp: must be str" in errors
    assert "latin1.toml: not UTF-8" in errors
    assert "nopid.toml: pidfile /nonexistent/q.pid" in errors
    assert dropins.scan(str(tmp_path / "missing")).vms == ()


def test_dirwatch_wakes_on_rename_and_delete_and_follows_a_late_directory(tmp_path):
    target = tmp_path / "later"
    watch = DirWatch(str(target))
    try:
        assert watch.fileno() is not None, "inotify_init1 failed"
        assert not watch.watching and not watch.drain()
        target.mkdir()
        watch.tick()
        assert watch.watching
        (target / ".a.xml.new").write_text("x")
        os.rename(target / ".a.xml.new", target / "a.xml")
        assert watch.drain()
        assert not watch.drain()  # drained
        (target / "a.xml").unlink()
        assert watch.drain()
        target.rmdir()
        watch.drain()
        assert not watch.watching  # gone: looked for again on the next tick
        target.mkdir()
        watch.tick()
        assert watch.watching
    finally:
        watch.close()
