"""The Hugging Face hub as this project reads it: one pinned snapshot of a dataset repository, parquet read by ranges.

`bigscience/P3` holds 2,085 configs, one folder each (`<config>/<split>-00000-of-00001.parquet` since its 2024
conversion to parquet), and a ~1.5 MB README whose YAML maps every config to its files. `datasets` re-parses that
README for every config it opens (`load_dataset_builder`: seconds of CPU and ~10 HTTP requests each); here the files
are found by what the repository holds instead:

    snapshot(repo)   1 request  `HfApi.dataset_info(repo, expand=["sha"])`: the commit every later request names
                     + pages    `HfApi.list_repo_tree(repo, recursive=True, revision=sha)`: 1000 entries a page
                                (P3's layout: about 8), kept in memory for the process (`_SNAPSHOTS`)
    HubFile(...)     1 request  per read the handle has not cached: `GET <endpoint>/datasets/<repo>/resolve/<sha>/
                                <path>` with a `Range` header. pyarrow reads a parquet footer with one read of the
                                file's last 64 KB; `prefetch` fetches a row group's wanted column chunks in one range
                                (chunks less than MERGE_GAP apart are merged), so a row group costs one request.

So a run reads one consistent commit even if the repository moves on, and no parquet file larger than 64 KB is ever
downloaded in full. The HTTP is huggingface_hub's (its shared client, `HF_ENDPOINT`, token, user agent); every range
read goes through its `http_backoff`, which retries connection errors, timeouts, responses cut short
(`RemoteProtocolError`: an interrupted transfer) and HTTP 408/429/5xx RETRIES times, waiting RETRY_WAIT, 2x, 4x...
(at most 8 s); anything else (404, 401/403) fails at once. Every failure is a `HubError` (an OSError) whose message
is one line naming the repository, the file and the cause.
"""
import io

RETRIES, RETRY_WAIT = 5, 1.0  # http_backoff's defaults: waits of 1, 2, 4, 8, 8 s
MERGE_GAP = 1 << 20  # column chunks closer than this are fetched in one request
_SNAPSHOTS = {}  # (endpoint, repo) -> Snapshot: one listing per process


class HubError(OSError):
    """The hub could not serve something. `reason`: the cause as a clause ("no dataset repository ... on the hub")."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


def failures():
    """The exceptions a hub request ends with: huggingface_hub's (OSErrors) and its HTTP client's."""
    import httpx2  # huggingface_hub's HTTP client (huggingface_hub >= 2)
    return OSError, httpx2.HTTPError


def could_be_repo_id(name):
    """True when `name` is a valid `namespace/name` hub repository id (huggingface_hub's rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def reason(err, kind, repo):
    """One clause saying why the hub did not serve `repo` (a "dataset" or "model" repository)."""
    from huggingface_hub import constants, errors
    hub = f"the Hugging Face hub ({constants.ENDPOINT})"
    if isinstance(err, errors.OfflineModeIsEnabled) or constants.is_offline_mode():
        cached = f", and {repo!r} is not in the local cache ({constants.HF_HUB_CACHE})" if kind == "model" else ""
        return f"the Hugging Face hub is not asked in offline mode (HF_HUB_OFFLINE=1){cached}"
    if isinstance(err, errors.GatedRepoError):
        return f"{kind} repository {repo!r} on {hub} is gated: accept its terms, then `hf auth login`"
    if isinstance(err, errors.RepositoryNotFoundError):
        return f"no {kind} repository {repo!r} on {hub}"
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{hub} no longer has the commit of {repo!r} this run started from"
    if isinstance(err, errors.HfHubHTTPError) and err.response is not None:
        code = err.response.headers.get("X-Error-Code")
        return f"{hub} answered HTTP {err.response.status_code}" + (f" {code}" if code else "")
    text = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{hub} could not be reached ({type(err).__name__}: {text})"


class Snapshot:
    """One commit of a hub dataset repository: `sha` and `files` {path: size}, from one recursive listing."""

    def __init__(self, repo, sha, files):
        from huggingface_hub.utils import build_hf_headers
        self.repo, self.sha, self.files, self.headers = repo, sha, files, build_hf_headers()

    def describe(self, path):
        """The file's address at the pinned commit (huggingface_hub's `hf://` form, openable by HfFileSystem)."""
        return f"hf://datasets/{self.repo}@{self.sha}/{path}"

    def open(self, path):
        return HubFile(self, path)


def snapshot(repo):
    """The repository's Snapshot, listed once per process (and endpoint). Raises HubError."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile
    key = (constants.ENDPOINT, repo)
    if key not in _SNAPSHOTS:
        api = HfApi()
        try:
            if constants.is_offline_mode():
                raise HubError("offline")
            sha = api.dataset_info(repo, expand=["sha"]).sha
            files = {e.path: e.size for e in api.list_repo_tree(repo, repo_type="dataset", recursive=True,
                                                               revision=sha) if isinstance(e, RepoFile)}
        except failures() as e:
            why = reason(e, "dataset", repo)
            raise HubError(f"could not list {repo!r}: {why}", why) from e
        _SNAPSHOTS[key] = Snapshot(repo, sha, files)
    return _SNAPSHOTS[key]


def forget_snapshots():
    """Drop the listings kept in memory (the next `snapshot` lists again, at the repository's newest commit)."""
    _SNAPSHOTS.clear()


def column_spans(meta, groups, columns):
    """[(start, end)] byte ranges of the chunks of top-level `columns` in row `groups`, merged across gaps smaller
    than MERGE_GAP (pyarrow reads each column chunk as one range from its dictionary or first data page)."""
    spans = []
    for g in groups:
        rg = meta.row_group(g)
        for i in range(rg.num_columns):
            cc = rg.column(i)
            if cc.path_in_schema.split(".")[0] in columns:
                start = cc.data_page_offset
                if cc.has_dictionary_page and cc.dictionary_page_offset:
                    start = min(start, cc.dictionary_page_offset)
                spans.append((start, start + cc.total_compressed_size))
    merged = []
    for a, b in sorted(spans):
        if merged and a - merged[-1][1] < MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class HubFile(io.RawIOBase):
    """A read-only file over one file of a Snapshot (size known from the listing): each read its cache cannot serve
    is one HTTP range request at the pinned commit; what was fetched stays cached while the handle is open."""

    def __init__(self, snap, path):
        from huggingface_hub import hf_hub_url
        super().__init__()
        self.snap, self.path, self.size, self.pos, self.chunks = snap, path, snap.files[path], 0, []
        self.url = hf_hub_url(snap.repo, path, repo_type="dataset", revision=snap.sha)

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        data = self._get(self.pos, end) if end > self.pos else b""
        self.pos += len(data)
        return data

    def readall(self):
        return self.read()

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def prefetch(self, spans):
        """Fetch these byte ranges (one request each) unless cached."""
        for a, b in spans:
            b = min(b, self.size)
            if b > a and self._cached(a, b) is None:
                self._fetch(a, b)

    def _cached(self, a, b):
        for start, data in self.chunks:
            if start <= a and b <= start + len(data):
                return data[a - start:b - start]
        return None

    def _get(self, a, b):
        data = self._cached(a, b)
        return data if data is not None else self._fetch(a, b)

    def _fetch(self, a, b):
        from huggingface_hub import constants
        from huggingface_hub.utils import hf_raise_for_status, http_backoff
        where = f"{self.snap.describe(self.path)} (bytes {a}-{b - 1} of {self.size})"
        try:
            r = http_backoff("GET", self.url, headers={**self.snap.headers, "Range": f"bytes={a}-{b - 1}"},
                             max_retries=RETRIES, base_wait_time=RETRY_WAIT,
                             timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(r)
        except failures() as e:
            why = reason(e, "dataset", self.snap.repo)
            status = getattr(getattr(e, "response", None), "status_code", 0)
            retried = not isinstance(e, OSError) or status in (408, 429) or status >= 500
            raise HubError(f"could not read {where}: {why}" + (f" (tried {RETRIES + 1} times)" if retried else ""),
                           why) from e
        data = r.content if r.status_code == 206 else r.content[a:b]  # 200: a server that ignored the range
        if len(data) != b - a:
            raise HubError(f"could not read {where}: {len(data)} bytes came instead of {b - a}; the hub's copy "
                           "differs from its listing; run the same command again")
        self.chunks.append((a, data))
        return data
