// Command render executes an Ollama Modelfile TEMPLATE with Go's own text/template, on the data Ollama
// gives a template, so tests can check what a served model reads.
//
// Input (stdin, JSON): {"template": "<TEMPLATE string>", "conversations": [[{"role": ..., "content": ...}, ...], ...]}
// Output (stdout, JSON): {"outputs": [{"text": "...", "error": ""}, ...]}, one per conversation. A template
// that Ollama would refuse to parse makes the command exit 1 with the parse error on stderr.
//
// The data model follows Ollama's template package (server/prompt.go renders with template.Values{Messages}):
//   - the template is parsed with Option("missingkey=zero") and Ollama's extra functions (json,
//     currentDate, yesterdayDate, toTypeScriptType) on top of text/template's builtins;
//   - a template that names neither Messages nor Response gets a trailing {{ .Response }};
//   - messages are collated: consecutive messages of one role (except "tool") are merged with "\n\n";
//     .System is every system message joined with "\n\n"; system messages stay in .Messages;
//   - a template that names Messages is executed once on {System, Messages, Tools, Response: "", Think,
//     ThinkLevel, IsThinkSet}, each message having Role, Content, Thinking, Images, ToolCalls, ToolName,
//     ToolCallID;
//   - any other ("legacy") template is executed once per turn on {System, Prompt, Response}, and for the
//     last turn with everything after the {{ .Response }} field cut away.
//
// Tools, images and thinking are not modelled (always empty).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type inputMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// message carries the fields Ollama exposes to templates for each message.
type message struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type request struct {
	Template      string           `json:"template"`
	Conversations [][]inputMessage `json:"conversations"`
}

type output struct {
	Text  string `json:"text"`
	Error string `json:"error"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":      func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string { return "any" },
}

// identifiers lists the field and variable names a node uses, as Ollama's template.Identifiers does
// (chains are not followed; an action or template call without a pipeline is an error).
func identifiers(n parse.Node) ([]string, error) {
	var out []string
	add := func(m parse.Node) error {
		if m == nil {
			return nil
		}
		ids, err := identifiers(m)
		out = append(out, ids...)
		return err
	}
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil, nil
		}
		for _, c := range n.Nodes {
			if err := add(c); err != nil {
				return out, err
			}
		}
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return identifiers(n.Pipe)
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.BranchNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined branch")
		}
		if err := add(n.Pipe); err != nil {
			return out, err
		}
		if n.List != nil {
			if err := add(n.List); err != nil {
				return out, err
			}
		}
		if n.ElseList != nil {
			if err := add(n.ElseList); err != nil {
				return out, err
			}
		}
	case *parse.PipeNode:
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				if err := add(a); err != nil {
					return out, err
				}
			}
		}
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return out, nil
}

// vars: the lower-cased identifiers of every template in the set (the main one and its {{ define }}s).
func vars(t *template.Template) (map[string]bool, error) {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil || tt.Tree.Root == nil {
			continue
		}
		for _, n := range tt.Tree.Root.Nodes {
			ids, err := identifiers(n)
			if err != nil {
				return nil, err
			}
			for _, id := range ids {
				set[strings.ToLower(id)] = true
			}
		}
	}
	return set, nil
}

func responseAction() *parse.ActionNode {
	field := &parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}
	cmd := &parse.CommandNode{NodeType: parse.NodeCommand, Args: []parse.Node{field}}
	return &parse.ActionNode{NodeType: parse.NodeAction, Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{cmd}}}
}

func parseTemplate(s string) (*template.Template, map[string]bool, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(s)
	if err != nil {
		return nil, nil, err
	}
	v, err := vars(t)
	if err != nil {
		return nil, nil, err
	}
	if !v["messages"] && !v["response"] {
		t.Tree.Root.Nodes = append(t.Tree.Root.Nodes, responseAction())
	}
	return t, v, nil
}

// collate merges consecutive same-role messages (not "tool") with "\n\n" and joins all system contents.
func collate(in []inputMessage) (string, []*message) {
	var system []string
	var out []*message
	for _, m := range in {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &message{Role: m.Role, Content: m.Content})
		}
	}
	return strings.Join(system, "\n\n"), out
}

// cutAfterResponse drops, in document order, every node that comes after the first {{ .Response }} field
// (the field itself stays): what Ollama renders for the last turn of a legacy template. Branch
// conditions are not searched for the field, as in Ollama.
func cutAfterResponse(root *parse.ListNode) *parse.ListNode {
	cut := false
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if cut {
			return nil
		}
		switch t := n.(type) {
		case *parse.FieldNode:
			for _, id := range t.Ident {
				if id == "Response" {
					cut = true
				}
			}
		case *parse.ListNode:
			if t == nil {
				return t
			}
			var kept []parse.Node
			for _, c := range t.Nodes {
				if k := walk(c); k != nil {
					kept = append(kept, k)
				}
			}
			t.Nodes = kept
		case *parse.IfNode:
			walkBranch(&t.BranchNode, walk)
		case *parse.RangeNode:
			walkBranch(&t.BranchNode, walk)
		case *parse.WithNode:
			walkBranch(&t.BranchNode, walk)
		case *parse.ActionNode:
			p := walk(t.Pipe)
			if p == nil {
				return nil
			}
			t.Pipe = p.(*parse.PipeNode)
		case *parse.PipeNode:
			var cmds []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if k := walk(a); k != nil {
						args = append(args, k)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				cmds = append(cmds, c)
			}
			if len(cmds) == 0 {
				return nil
			}
			t.Cmds = cmds
		}
		return n
	}
	return walk(root).(*parse.ListNode)
}

func walkBranch(b *parse.BranchNode, walk func(parse.Node) parse.Node) {
	if b.List != nil {
		if l, ok := walk(b.List).(*parse.ListNode); ok {
			b.List = l
		} else {
			b.List = &parse.ListNode{NodeType: parse.NodeList}
		}
	}
	if b.ElseList != nil {
		if l, ok := walk(b.ElseList).(*parse.ListNode); ok {
			b.ElseList = l
		} else {
			b.ElseList = nil
		}
	}
}

func execute(t *template.Template, v map[string]bool, msgs []inputMessage) (string, error) {
	system, collated := collate(msgs)
	var b bytes.Buffer
	if v["messages"] {
		err := t.Execute(&b, map[string]any{
			"System": system, "Messages": collated, "Tools": []any(nil), "Response": "",
			"Think": false, "ThinkLevel": "", "IsThinkSet": false,
		})
		return b.String(), err
	}
	// legacy: one execution per (system, prompt, response) turn
	system = ""
	var prompt, response string
	run := func(tt *template.Template) error {
		err := tt.Execute(&b, map[string]any{
			"System": system, "Prompt": prompt, "Response": response,
			"Think": false, "ThinkLevel": "", "IsThinkSet": false,
		})
		system, prompt, response = "", "", ""
		return err
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := run(t); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := run(t); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	tree := &parse.Tree{Root: cutAfterResponse(t.Tree.Root.Copy().(*parse.ListNode))}
	last, err := template.New("").AddParseTree("", tree)
	if err != nil {
		return "", err
	}
	if err := run(last); err != nil {
		return "", err
	}
	return b.String(), nil
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render: reading stdin:", err)
		os.Exit(2)
	}
	var req request
	if err := json.Unmarshal(raw, &req); err != nil {
		fmt.Fprintln(os.Stderr, "render: stdin is not {\"template\", \"conversations\"} JSON:", err)
		os.Exit(2)
	}
	t, v, err := parseTemplate(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render: template does not parse:", err)
		os.Exit(1)
	}
	outs := make([]output, len(req.Conversations))
	for i, conv := range req.Conversations {
		text, err := execute(t, v, conv)
		if err != nil {
			outs[i] = output{Error: err.Error()}
		} else {
			outs[i] = output{Text: text}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(map[string]any{"outputs": outs}); err != nil {
		fmt.Fprintln(os.Stderr, "render: writing stdout:", err)
		os.Exit(2)
	}
}
