"""The program `hub_user.embed_as_hub_user` runs, by path, in a fresh isolated interpreter (`python -I`).

It stands for a Hub user who downloaded the folder: it imports only the standard library, torch, transformers,
sentence-transformers (and PEFT for an adapter folder), never diffembed_hf, and loads the folder through
`AutoModel` and `SentenceTransformer` with `trust_remote_code=True`. Arguments: the folder, the base model folder
of an adapter (or ""), the texts as JSON, the maximum length (or ""), the output JSON file, and the JSON list of
folders that hold those libraries (`python -I` drops the user site and PYTHONPATH, where they may live). A
failure exits with a line `LOAD FAILED: <step and reason>` on stderr, which the caller reports.
"""

import json
import sys
import traceback


def fail(message: str):
    sys.exit("LOAD FAILED: " + message)


def step(name: str, run):
    """Run one loading step; any failure becomes a `LOAD FAILED` line naming the step."""
    try:
        return run()
    except FloatingPointError as err:  # the model refuses to return a NaN embedding
        fail(f"{name}: the embeddings are not finite ({err})")
    except Exception as err:  # noqa: BLE001 - whatever a Hub user's load raises is the finding
        traceback.print_exc()
        fail(f"{name} raised {type(err).__name__}: {err}")


def main(argv: list[str]) -> None:
    folder, base, texts, max_length, out, library_paths = argv
    sys.path.extend(path for path in json.loads(library_paths) if path not in sys.path)
    sys.modules["diffembed_hf"] = None  # a Hub user does not have this package
    base = base or None
    texts = json.loads(texts)
    max_length = int(max_length) if max_length else None

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def auto_model():
        model = AutoModel.from_pretrained(base or folder, trust_remote_code=True).to(device).eval()
        module = type(model).__module__
        if not module.startswith("transformers_modules"):
            fail(f"AutoModel built {type(model).__name__} from {module}, not from the folder's remote code")
        dtype = str(next(model.parameters()).dtype)
        if base:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(base or folder, trust_remote_code=True)
        batch = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                          return_tensors="pt").to(device)
        with torch.no_grad():
            return model(**batch).embeddings.float().cpu(), module, dtype

    def sentence_transformer():
        st = SentenceTransformer(base or folder, trust_remote_code=True, device=device)
        if base:
            st.load_adapter(folder)
        return st.encode(texts, convert_to_tensor=True).float().cpu()

    auto, module, dtype = step("AutoModel", auto_model)  # one model in memory at a time
    sentence = step("SentenceTransformer", sentence_transformer)
    with open(out, "w") as handle:
        json.dump({"module": module, "dtype": dtype, "auto_model": auto.tolist(),
                   "sentence_transformer": sentence.tolist()}, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
