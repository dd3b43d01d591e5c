"""A local stand-in for the Hugging Face Hub's HTTP API, so tests exercise the real hub clients without a network.

`HubEmulator(root_dir)` serves the plain directories `root_dir/models/<owner>/<name>/...` and
`root_dir/datasets/<owner>/<name>/...` as hub repositories, well enough for huggingface_hub (HfApi, hf_hub_download,
snapshot_download, HfFileSystem / `hf://` fsspec reads) and `datasets` (config names, README `configs:` data files):

    GET  /api/{models,datasets}/<repo>[/revision/<rev>]     repo info: id, sha, siblings (+ size/blobId/lfs: ?blobs=1)
    GET  /api/{models,datasets}/<repo>/tree/<rev>[/<dir>]  ?recursive=&expand=; 1000 entries a page (50 with expand),
                                                            the next page's URL in `Link: <...>; rel="next"`
    POST /api/{models,datasets}/<repo>/paths-info/<rev>    form (as huggingface_hub sends it) or JSON {paths, expand}
    HEAD/GET /<repo>/resolve/<rev>/<path>, /datasets/<repo>/resolve/<rev>/<path>
        X-Repo-Commit, ETag (git blob sha1; for LFS files the sha256, also in X-Linked-Etag, with X-Linked-Size),
        Content-Length, Accept-Ranges; `Range: bytes=a-b | a- | -n` -> 206 + Content-Range, 416 when unsatisfiable.
    anything else -> 404. Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) and
    X-Error-Message, so the clients raise RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError.

Revisions: "main" or the repo's commit sha (a sha1 over its files' oids). Repos are rescanned on every API call (and
on a read of a file that changed), so files written while serving show up, under a new sha. LFS files:
those a `filter=lfs` pattern of the repo's .gitattributes matches (without one: LFS_SUFFIXES); their tree entries
carry `lfs: {oid: sha256, size, pointerSize}` and their oid is that of the LFS pointer, as on the hub. Not emulated:
writes, auth (tokens are ignored), Xet (no X-Xet-Hash, so clients download over plain HTTP), CDN redirects (files
come straight from /resolve), datasets-server.

    with HubEmulator(tmp_path) as hub:          # or hub = HubEmulator(tmp_path).start(); ...; hub.stop()
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")   # point huggingface_hub and datasets at it
        hub.requests        # [Request, ...]: ("GET", "/api/...") tuples, arrival order, `.headers` (lower-case keys)
        hub.reset_counts()  # forget them; hub.count("/resolve/", "GET") counts them
        hub.fail_paths = {"/resolve/main/x": 503}    # requests whose path contains the key get that status
        hub.truncate_paths = {"model.safetensors": 100}   # the next GET of it stops after 100 bytes (then EOF)

`make_p3_repo` / `make_t5_model_repo` write a bigscience/P3-like dataset repo (the hub's layout since P3's 2024
conversion to parquet: `<config>/<split>-00000-of-00001.parquet`, README `configs:` -> `<config>/<split>-*`) and a
google/t5-*-lm-adapt-like model. The server needs only the standard library; the builders use pyarrow/numpy and
torch/safetensors.
"""
import csv
import fnmatch
import hashlib
import io
import json
import os
import socket
import threading
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

PAGE_SIZE, PAGE_SIZE_EXPAND = 1000, 50
LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".model", ".h5", ".msgpack", ".pt", ".arrow", ".zip", ".gz")
DATE = "2024-03-04T10:00:00.000Z"
TABLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "p3")
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)


class Request(tuple):
    """One logged request: the tuple (method, path incl. query), with `.headers` (dict, lower-case names)."""

    def __new__(cls, method, path, headers):
        self = super().__new__(cls, (method, path))
        self.method, self.path, self.headers = method, path, headers
        return self


def _git_oid(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _scan(top):
    """{path: (size, mtime_ns)} of every file below top and {path: None} of every directory ("" included)."""
    out, todo = {"": None}, [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(top, rel)) as it:
            for e in it:
                path = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir():
                    if e.name != ".git":
                        out[path] = None
                        todo.append(path)
                else:
                    st = e.stat()
                    out[path] = (st.st_size, st.st_mtime_ns)
    return out


class _Repo:
    """A snapshot of one repository directory: files {path: (abs path, size, oid, sha256 or None, pointer size)},
    directories {path: tree oid}, children {dir: sorted names}, commit sha. Rebuilt when a scan differs."""

    def __init__(self, top, repo_id, scan, hashes):
        self.id, self.scan, self.files, self.dirs, self._walks = repo_id, scan, {}, {}, {}
        self.children = {p: [] for p, v in scan.items() if v is None}
        attrs = os.path.join(top, ".gitattributes")
        if ".gitattributes" in scan:
            with open(attrs) as f:
                lines = f.read().splitlines()
        else:
            lines = _GITATTRIBUTES.splitlines()
        lfs = [ln.split()[0] for ln in lines if "filter=lfs" in ln]
        for path, stat in scan.items():
            if path:
                self.children[path.rpartition("/")[0]].append(path.rpartition("/")[2])
            if stat is None:
                continue
            name = path.rpartition("/")[2]
            key = (top, path, *stat, any(fnmatch.fnmatch(path if "/" in p else name, p) for p in lfs))
            if key not in hashes:
                with open(os.path.join(top, path), "rb") as f:
                    data = f.read()
                if key[-1]:
                    sha = hashlib.sha256(data).hexdigest()
                    ptr = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
                    hashes[key] = (_git_oid(ptr.encode()), sha, len(ptr))
                else:
                    hashes[key] = (_git_oid(data), None, None)
            self.files[path] = (os.path.join(top, path), stat[0], *hashes[key])
        for d in sorted(self.children, key=lambda d: -(d.count("/") + bool(d))):  # deepest first, as git hashes
            kids = self.children[d] = sorted(self.children[d])
            body = "".join(f"{k} {self.oid(f'{d}/{k}' if d else k)}\n" for k in kids)
            self.dirs[d] = hashlib.sha1(f"tree {body}".encode()).hexdigest()
        self.sha = hashlib.sha1(f"commit {repo_id} {self.dirs['']}".encode()).hexdigest()

    def oid(self, path):
        return self.dirs[path] if path in self.dirs else self.files[path][2]

    def walk(self, d, recursive):
        """Paths below directory d: folders first, then files, each folder followed by its content if recursive."""
        if (d, recursive) not in self._walks:
            kids = [f"{d}/{k}" if d else k for k in self.children[d]]
            out = []
            for p in [k for k in kids if k in self.dirs] + [k for k in kids if k not in self.dirs]:
                out += [p] + (self.walk(p, True) if recursive and p in self.dirs else [])
            self._walks[(d, recursive)] = out
        return self._walks[(d, recursive)]

    def entry(self, path, expand=False):
        if path in self.dirs:
            e = {"type": "directory", "oid": self.dirs[path], "size": 0, "path": path}
        else:
            _, size, oid, sha, ptr = self.files[path]
            e = {"type": "file", "oid": oid, "size": size, "path": path}
            if sha:
                e["lfs"] = {"oid": sha, "size": size, "pointerSize": ptr}
            if expand:
                e["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                           "pickleImportScan": None}
        if expand:
            e["lastCommit"] = {"id": self.sha, "title": "Upload dataset", "date": DATE}
        return e


class _HubError(Exception):
    def __init__(self, status, code, message, headers=()):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, list(headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect
    timeout = 60  # an idle keep-alive connection is dropped after this long

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve()

    do_GET = do_POST = do_HEAD

    def _serve(self):
        hub = self.server.hub
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self.rfile.read(int(headers.get("content-length") or 0))
        hub._record(Request(self.command, self.path, headers))
        try:
            for key, status in dict(hub.fail_paths).items():
                if key in self.path:
                    raise _HubError(status, None, f"emulated failure ({status}) for {self.path}")
            self._route(urlsplit(self.path), body)
        except _HubError as e:
            err = [("X-Error-Code", e.code)] if e.code else []
            self._send(e.status, json.dumps({"error": e.message}).encode(),
                       err + [("X-Error-Message", e.message)] + e.headers)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # an emulator bug: say so instead of hanging up
            traceback.print_exc()
            self._send(500, json.dumps({"error": repr(e)}).encode(), [("X-Error-Message", repr(e)[:200])])

    def _send(self, status, body=b"", headers=(), ctype="application/json; charset=utf-8"):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, headers=()):
        self._send(200, json.dumps(obj).encode(), headers)

    def _route(self, url, body):
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets"):
            repo, rest = self._repo(parts[1], f"{parts[2]}/{parts[3]}"), parts[4:]
            if not rest and self.command == "GET":
                return self._info(repo, "main", query)
            if len(rest) == 2 and rest[0] == "revision" and self.command == "GET":
                return self._info(repo, rest[1], query)
            if len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                return self._tree(repo, rest[1], "/".join(rest[2:]).strip("/"), url, query)
            if len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                return self._paths_info(repo, rest[1], body)
        elif len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve" and self.command != "POST":
            path = "/".join(parts[5:])
            return self._resolve(self._repo("datasets", f"{parts[1]}/{parts[2]}", path), parts[4], path)
        elif len(parts) >= 5 and parts[2] == "resolve" and self.command != "POST":
            path = "/".join(parts[4:])
            return self._resolve(self._repo("models", f"{parts[0]}/{parts[1]}", path), parts[3], path)
        raise _HubError(404, None, "Not Found")

    def _repo(self, kind, repo_id, path=None):
        """The repo's snapshot, rescanned unless `path` (a file read) is in it and unchanged since."""
        hub, top = self.server.hub, os.path.join(self.server.hub.root, kind, *repo_id.split("/"))
        if ".." in repo_id.split("/") or not os.path.isdir(top):
            raise _HubError(404, "RepoNotFound", "Repository not found")
        repo = hub._repos.get(top)
        if repo is not None and repo.scan.get(path):
            try:
                st = os.stat(os.path.join(top, path))
                if repo.scan[path] == (st.st_size, st.st_mtime_ns):
                    return repo
            except OSError:
                pass
        scan = _scan(top)
        if repo is None or repo.scan != scan:
            repo = hub._repos[top] = _Repo(top, repo_id, scan, hub._hashes)
        return repo

    @staticmethod
    def _check(repo, rev):
        if rev not in ("main", "refs/heads/main", repo.sha):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _info(self, repo, rev, query):
        self._check(repo, rev)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for p, (_, size, oid, sha, ptr) in sorted(repo.files.items()):
            s = {"rfilename": p}
            if blobs:
                s.update(size=size, blobId=oid, **({"lfs": {"sha256": sha, "size": size, "pointerSize": ptr}}
                                                   if sha else {}))
            siblings.append(s)
        self._json({"_id": repo.sha[:24], "id": repo.id, "author": repo.id.split("/")[0], "sha": repo.sha,
                    "lastModified": DATE, "createdAt": DATE, "private": False, "gated": False, "disabled": False,
                    "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                    "usedStorage": sum(f[1] for f in repo.files.values())})

    def _tree(self, repo, rev, path, url, query):
        self._check(repo, rev)
        if path not in repo.dirs:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"",
                            [("X-Repo-Commit", repo.sha)])
        recursive = query.get("recursive", "").lower() in ("1", "true")
        expand = query.get("expand", "").lower() in ("1", "true")
        size = PAGE_SIZE_EXPAND if expand else PAGE_SIZE
        start = int(query.get("cursor", 0))
        paths = repo.walk(path, recursive)
        headers = []
        if start + size < len(paths):
            nxt = (f"http://{self.headers['Host']}{url.path}?recursive={str(recursive).lower()}"
                   f"&expand={str(expand).lower()}&cursor={start + size}")
            headers.append(("Link", f'<{nxt}>; rel="next"'))
        self._json([repo.entry(p, expand) for p in paths[start:start + size]], headers)

    def _paths_info(self, repo, rev, body):
        self._check(repo, rev)
        if body[:1] in (b"{", b"["):
            req = json.loads(body)
            paths, expand = req.get("paths", []), bool(req.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() in ("1", "true")
        paths = [p.strip("/") for p in ([paths] if isinstance(paths, str) else paths)]
        self._json([repo.entry(p, expand) for p in paths if p in repo.files or (p and p in repo.dirs)])

    def _resolve(self, repo, rev, path):
        hub = self.server.hub
        self._check(repo, rev)
        if path not in repo.files:
            raise _HubError(404, "EntryNotFound", "Entry not found", [("X-Repo-Commit", repo.sha)])
        full, size, oid, sha, _ = repo.files[path]
        headers = [("X-Repo-Commit", repo.sha), ("ETag", f'"{sha or oid}"'), ("Accept-Ranges", "bytes")]
        if sha:
            headers += [("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", str(size))]
        start, end, status = 0, size - 1, 200
        a, _, b = self.headers.get("Range", "").removeprefix("bytes=").split(",")[0].strip().partition("-")
        if self.command == "GET" and self.headers.get("Range", "").startswith("bytes=") and (a + b).isdigit():
            start, end = (int(a), min(int(b), size - 1) if b else size - 1) if a else (max(size - int(b), 0), size - 1)
            if start >= size or end < start:
                raise _HubError(416, None, "Range Not Satisfiable", [("Content-Range", f"bytes */{size}")])
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            status = 206
        length = end - start + 1
        with hub._lock:  # one-shot: the entry is dropped once it has cut a response short
            key = next((k for k in hub.truncate_paths if k in self.path), None) if self.command == "GET" else None
            cut = hub.truncate_paths.pop(key) if key is not None else None
        self.send_response(status)
        for k, v in headers + [("Content-Type", "application/octet-stream"), ("Content-Length", str(length))]:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        todo = length if cut is None else min(cut, length)
        with open(full, "rb") as f:
            f.seek(start)
            while todo > 0:
                chunk = f.read(min(todo, 1 << 16))
                self.wfile.write(chunk)
                todo -= len(chunk)
        if cut is not None and cut < length:  # an interrupted download: fewer bytes than announced, then EOF
            self.wfile.flush()
            self.close_connection = True


class _Server(HTTPServer):
    """One thread per connection; stop() closes the kept-alive connections and joins their threads."""

    def process_request(self, request, client_address):
        # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm holds the body until
        # the client's delayed ACK (~40 ms on Linux), which would make every small response take 40 ms
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.conns.add(request)
            t = threading.Thread(target=self._work, args=(request, client_address), name="hub-emulator-conn",
                                 daemon=True)
            self.workers = [w for w in self.workers if w.is_alive()] + [t]
        t.start()

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            pass
        finally:
            with self.lock:
                self.conns.discard(request)
            self.shutdown_request(request)


class HubEmulator:
    """The hub's HTTP API over `root_dir` (see the module docstring). A context manager; `.url` once started."""

    def __init__(self, root_dir, host="127.0.0.1", port=0):
        self.root, self.host, self.port = os.fspath(root_dir), host, port
        self.fail_paths, self.truncate_paths, self._repos = {}, {}, {}
        self._log, self._lock, self._hashes, self._httpd, self._thread = [], threading.Lock(), {}, None, None

    def start(self):
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.hub, self._httpd.lock, self._httpd.conns, self._httpd.workers = self, threading.Lock(), set(), []
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self):
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def stop(self):
        if self._httpd is None:
            return
        httpd, self._httpd = self._httpd, None
        httpd.shutdown()
        with httpd.lock:
            conns, workers = list(httpd.conns), list(httpd.workers)
        for c in conns:  # wake handlers blocked on an idle keep-alive connection
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for w in workers:
            w.join(10)
        httpd.server_close()
        self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _record(self, request):
        with self._lock:
            self._log.append(request)

    @property
    def requests(self):
        with self._lock:
            return list(self._log)

    def reset_counts(self):
        with self._lock:
            self._log.clear()

    def count(self, substring="", method=None):
        """How many logged requests have `substring` in their path (and the given method)."""
        return sum(substring in r.path and method in (None, r.method) for r in self.requests)


def use_hub(monkeypatch, url, hf_home):
    """Point huggingface_hub and `datasets` at `url`, online, with every cache under hf_home; monkeypatch undoes it.
    Both libraries read HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME once, at import, into module constants, so setting the
    environment is not enough: those constants are patched too. `datasets` is imported first (if installed) so a
    later import cannot capture the temporary environment for good."""
    import huggingface_hub.constants as c
    from huggingface_hub.utils import _http
    try:
        import datasets.config as dc
    except ImportError:
        dc = None
    hf_home = os.fspath(hf_home)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(var, raising=False)
    env = {"HF_ENDPOINT": url, "HF_HOME": hf_home, "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
           "HF_DATASETS_CACHE": os.path.join(hf_home, "datasets"), "HF_XET_CACHE": os.path.join(hf_home, "xet"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_XET": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    host = urlsplit(url).hostname
    for name, value in dict(
            ENDPOINT=url, HUGGINGFACE_CO_URL_TEMPLATE=url + "/{repo_id}/resolve/{revision}/{filename}",
            HF_HUB_OFFLINE=False, HF_HOME=hf_home, HF_HUB_CACHE=env["HF_HUB_CACHE"],
            HF_ASSETS_CACHE=os.path.join(hf_home, "assets"), HF_XET_CACHE=env["HF_XET_CACHE"],
            HF_HUB_DISABLE_TELEMETRY=True, HF_HUB_DISABLE_XET=True, HF_URL_HOSTS=c.HF_URL_HOSTS | {host},
            AGENT_HARNESSES_PATH=os.path.join(hf_home, ".agent_harnesses.json")).items():
        monkeypatch.setattr(c, name, value)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})
    if dc is not None:
        from pathlib import Path
        for name, value in dict(
                HF_ENDPOINT=url, HUB_DATASETS_URL=url + "/datasets/{repo_id}/resolve/{revision}/{path}",
                HF_HUB_OFFLINE=False, HF_DATASETS_OFFLINE=False, HF_UPDATE_DOWNLOAD_COUNTS=False,
                USE_PARQUET_EXPORT=False, HF_CACHE_HOME=hf_home, HF_DATASETS_CACHE=Path(env["HF_DATASETS_CACHE"]),
                HF_MODULES_CACHE=Path(hf_home, "modules"),
                DOWNLOADED_DATASETS_PATH=Path(env["HF_DATASETS_CACHE"], "downloads"),
                EXTRACTED_DATASETS_PATH=Path(env["HF_DATASETS_CACHE"], "downloads", "extracted")).items():
            monkeypatch.setattr(dc, name, value)


# ------------------------------------------------------------------------------------------------ repo builders
def _tsv(name):
    with open(os.path.join(TABLES, name), newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _dtype(arrow_type):
    return {"float": "float32", "double": "float64"}.get(str(arrow_type), str(arrow_type))


def _dataset_info(table, splits, file_bytes):
    feats = "".join(f"  - name: {c.name}\n    " + (f"sequence: {_dtype(c.type.value_type)}\n" if hasattr(
        c.type, "value_type") else f"dtype: {_dtype(c.type)}\n") for c in table.schema)
    sizes = "".join(f"  - name: {s}\n    num_bytes: {table.nbytes}\n    num_examples: {table.num_rows}\n"
                    for s in splits)
    return (f"  features:\n{feats}  splits:\n{sizes}  download_size: {file_bytes * len(splits)}\n"
            f"  dataset_size: {table.nbytes * len(splits)}\n")


def p3_config_names(count=2085):
    """`count` P3-style config names, sorted: the T0 training configs and the rank-eval `*_score_eval` configs
    of p3/t0_*_tasks.tsv (and each eval config's plain variant), then made-up `<dataset>_<subset>_prompt_<k>`
    names (half with a `_score_eval` twin) over the same datasets. The hub's P3 has 2085 configs."""
    train, evals = _tsv("t0_train_tasks.tsv"), _tsv("t0_eval_tasks.tsv")
    names = dict.fromkeys([r["p3_config"] for r in train] + [r["p3_config"] for r in evals]
                          + [r["p3_config"].removesuffix("_score_eval") for r in evals])
    prefixes = sorted({"_".join(filter(None, (r["dataset"], r.get("subset") or r.get("subset_or_round"))))
                       for r in train + evals})
    k = 0
    while len(names) < count:
        for prefix in prefixes:
            for name in (f"{prefix}_prompt_{k}", f"{prefix}_prompt_{k}_score_eval")[:1 + k % 2]:
                if len(names) < count:
                    names.setdefault(name.replace("-", "_").replace(" ", "_"))
        k += 1
    return sorted(list(names)[:count])


def p3_table(config, rows, kind, seed=0):
    """Rows in P3's schema (columns in the hub's order). kind: "plain", "choices" (+ answer_choices) or "score"
    (`*_score_eval`: one row per (example, choice) with idx, is_correct, weight and no answer_choices, as on the
    hub). `inputs` has no EOS, `targets` ends with EOS = 1."""
    import numpy as np
    import pyarrow as pa
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha1(config.encode()).digest()[:4], "little")])
    choices = ["yes", "no", "maybe"]
    ints, ex = pa.list_(pa.int32()), range(max(1, rows // 3) if kind == "score" else rows)
    if kind == "score":
        flat = [(e, c) for e in ex for c in range(len(choices))]
    else:
        flat = [(e, int(rng.integers(len(choices)))) for e in ex]
    n_in = rng.integers(8, 200, size=len(flat))
    cols = {}
    if kind == "choices":
        cols["answer_choices"] = pa.array([choices] * len(flat), pa.list_(pa.string()))
    if kind == "score":
        cols["idx"] = pa.array([[e, c] for e, c in flat], ints)
    cols["inputs"] = pa.array([rng.integers(3, 32000, size=n).tolist() for n in n_in], ints)
    cols["inputs_pretokenized"] = [f"{config} example {e}: is it so? " + "word " * int(n) for (e, _), n in
                                   zip(flat, n_in)]
    if kind == "score":
        answer = {e: int(rng.integers(len(choices))) for e in ex}
        cols["is_correct"] = [answer[e] == c for e, c in flat]
    cols["targets"] = pa.array([[3 + 10 * c, 1] for _, c in flat], ints)
    cols["targets_pretokenized"] = [choices[c] for _, c in flat]
    if kind == "score":
        cols["weight"] = pa.array([1.0] * len(flat), pa.float32())
    return pa.table(cols)


def make_p3_repo(root_dir, configs=2085, rows_per_config=4, readme_bytes=1_500_000, real_configs=(), real_rows=256,
                 splits=("train", "validation"), row_group_size=64, seed=0):
    """Write `datasets/bigscience/P3` under root_dir in the hub repo's layout (since its 2024 parquet conversion):
    `<config>/<split>-00000-of-00001.parquet`, a .gitattributes, and a README.md whose YAML front matter has a
    `dataset_info` (features, split sizes) and a `configs` entry (`data_files: - split: train  path: <config>/
    train-*`) per config, the card padded to ~readme_bytes. configs: names, or how many of p3_config_names().
    Most configs share one small file per schema; `real_configs` get real_rows rows of their own (several row
    groups of row_group_size). Returns the sorted config names."""
    import pyarrow.parquet as pq
    if isinstance(configs, int):  # the real_configs are always among them
        configs = list(real_configs) + [n for n in p3_config_names(configs) if n not in real_configs][
            :configs - len(real_configs)]
    names = sorted(configs)
    plain = {r["p3_config"] for r in _tsv("t0_train_tasks.tsv") if r["has_answer_choices"] == "False"}
    top = os.path.join(root_dir, "datasets", "bigscience", "P3")
    os.makedirs(top, exist_ok=True)
    shared, info, conf = {}, [], []
    for name in names:
        kind = "score" if name.endswith("_score_eval") else "plain" if name in plain else "choices"
        own = name in real_configs
        if own or kind not in shared:  # the parquet bytes and the config's dataset_info body (after its name)
            table, buf = p3_table(name, real_rows if own else rows_per_config, kind, seed), io.BytesIO()
            pq.write_table(table, buf, row_group_size=row_group_size)
            shared[name if own else kind] = buf.getvalue(), _dataset_info(table, splits, len(buf.getvalue()))
        data, body = shared[name if own else kind]
        os.makedirs(os.path.join(top, name), exist_ok=True)
        for split in splits:
            with open(os.path.join(top, name, f"{split}-00000-of-00001.parquet"), "wb") as f:
                f.write(data)
        info.append(f"- config_name: {name}\n{body}")
        conf.append(f"- config_name: {name}\n  data_files:\n"
                    + "".join(f"  - split: {s}\n    path: {name}/{s}-*\n" for s in splits))
    head = ("---\nannotations_creators:\n- crowdsourced\n- expert-generated\nlanguage:\n- en\nlicense:\n- apache-2.0\n"
            "multilinguality:\n- monolingual\nsize_categories:\n- 100M<n<1B\ntask_categories:\n- other\n"
            "pretty_name: P3\ndataset_info:\n" + "".join(info) + "configs:\n" + "".join(conf) + "---\n\n"
            "# Dataset Card for P3\n\nP3 (Public Pool of Prompts) is a collection of prompted English datasets "
            "covering a diverse set of NLP tasks (emulated copy for tests).\n\n## Data Splits\n\n"
            "| Config | " + " | ".join(splits) + " |\n|---|" + "---|" * len(splits) + "\n")
    rows, size = [], len(head)
    while size < readme_bytes:
        rows.append(f"| {names[len(rows) % len(names)]} | " + " | ".join(["4"] * len(splits)) + " |\n")
        size += len(rows[-1])
    with open(os.path.join(top, "README.md"), "w") as f:
        f.write(head + "".join(rows))
    with open(os.path.join(top, ".gitattributes"), "w") as f:
        f.write(_GITATTRIBUTES)
    return names


def make_t5_model_repo(root_dir, name="google/t5-small-lm-adapt", d_model=16, d_ff=32, d_kv=4, num_heads=2,
                       num_layers=2, num_decoder_layers=None, vocab_size=128, num_buckets=32, spiece_model=None,
                       seed=0):
    """Write `models/<name>` under root_dir like google/t5-*-lm-adapt (T5 v1.1: gated-gelu, untied lm_head): a
    config.json and a model.safetensors of random float32 tensors under HF T5 names, incl. `lm_head.weight`
    (Linear weights [out, in], relative_attention_bias [num_buckets, heads] in block 0 of each stack), plus a
    copy of the `spiece_model` file if given. Returns the tensors (a dict)."""
    import torch
    from safetensors.torch import save_file
    top = os.path.join(root_dir, "models", *name.split("/"))
    os.makedirs(top, exist_ok=True)
    nd = num_layers if num_decoder_layers is None else num_decoder_layers
    g, inner = torch.Generator().manual_seed(seed), num_heads * d_kv

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    t = {"shared.weight": w(vocab_size, d_model)}
    for stack, n, attns in (("encoder", num_layers, ("SelfAttention",)),
                            ("decoder", nd, ("SelfAttention", "EncDecAttention"))):
        for i in range(n):
            pre = f"{stack}.block.{i}.layer"
            for j, att in enumerate(attns):
                t.update({f"{pre}.{j}.{att}.{x}.weight": w(inner, d_model) for x in "qkv"})
                t[f"{pre}.{j}.{att}.o.weight"] = w(d_model, inner)
                t[f"{pre}.{j}.layer_norm.weight"] = torch.ones(d_model)
            j = len(attns)
            t[f"{pre}.{j}.DenseReluDense.wi_0.weight"] = w(d_ff, d_model)
            t[f"{pre}.{j}.DenseReluDense.wi_1.weight"] = w(d_ff, d_model)
            t[f"{pre}.{j}.DenseReluDense.wo.weight"] = w(d_model, d_ff)
            t[f"{pre}.{j}.layer_norm.weight"] = torch.ones(d_model)
        t[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = w(num_buckets, num_heads)
        t[f"{stack}.final_layer_norm.weight"] = torch.ones(d_model)
    t["lm_head.weight"] = w(vocab_size, d_model)
    save_file(t, os.path.join(top, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["T5ForConditionalGeneration"], "d_ff": d_ff, "d_kv": d_kv, "d_model": d_model,
              "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
              "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06,
              "model_type": "t5", "num_decoder_layers": nd, "num_heads": num_heads, "num_layers": num_layers,
              "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
              "relative_attention_num_buckets": num_buckets, "tie_word_embeddings": False, "torch_dtype": "float32",
              "use_cache": True, "vocab_size": vocab_size}
    with open(os.path.join(top, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(top, ".gitattributes"), "w") as f:
        f.write(_GITATTRIBUTES)
    with open(os.path.join(top, "README.md"), "w") as f:
        f.write(f"---\nlicense: apache-2.0\nlanguage: en\n---\n\n# {name} (random weights, emulated for tests)\n")
    if spiece_model is not None:
        with open(spiece_model, "rb") as src, open(os.path.join(top, "spiece.model"), "wb") as dst:
            dst.write(src.read())
    return t
