"""A minimal reader of perfpy's gzip'd pprof files (protobuf wire format, no dependencies):
samples as (count, [function names, leaf first], {label: value})."""
import gzip


def _varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _fields(b):
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            v = b[i:i + n]
            i += n
        elif wt == 1:
            v = int.from_bytes(b[i:i + 8], "little")
            i += 8
        elif wt == 5:
            v = int.from_bytes(b[i:i + 4], "little")
            i += 4
        else:
            raise ValueError("bad wire type %d" % wt)
        yield num, wt, v


def _ints(wt, v):
    if wt == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def read(path):
    with open(path, "rb") as f:
        data = gzip.decompress(f.read())
    strings, samples, locs, funcs = [], [], {}, {}
    for num, wt, v in _fields(data):
        if num == 6:
            strings.append(v.decode("utf-8", "replace"))
        elif num == 2:
            samples.append(v)
        elif num == 4:
            lid, fids = 0, []
            for n2, w2, v2 in _fields(v):
                if n2 == 1:
                    lid = v2
                elif n2 == 4:
                    fid = next((v3 for n3, _, v3 in _fields(v2) if n3 == 1), 0)
                    fids.append(fid)
            locs[lid] = fids
        elif num == 5:
            fid = name = 0
            for n2, _, v2 in _fields(v):
                if n2 == 1:
                    fid = v2
                elif n2 == 2:
                    name = v2
            funcs[fid] = name
    out = []
    for s in samples:
        lids, vals, labels = [], [], {}
        for n2, w2, v2 in _fields(s):
            if n2 == 1:
                lids += _ints(w2, v2)
            elif n2 == 2:
                vals += _ints(w2, v2)
            elif n2 == 3:
                k = st = nm = 0
                for n3, _, v3 in _fields(v2):
                    if n3 == 1:
                        k = v3
                    elif n3 == 2:
                        st = v3
                    elif n3 == 3:
                        nm = v3
                labels[strings[k]] = strings[st] if st else nm
        names = [strings[funcs[f]] for l in lids for f in locs.get(l, [])]
        out.append((vals[0] if vals else 0, names, labels))
    return out
